#!/bin/bash
# Throwaway PKI for the KMIP tests: a CA, a server certificate for 127.0.0.1 /
# localhost (serverAuth) and a client certificate (clientAuth, which the PyKMIP
# server requires). Usage: kmip_certs.sh DIR. Everything is made fresh with openssl;
# keys are mode 0600 and live only in DIR (a test's scratch directory).
set -euo pipefail
dir=${1:?usage: kmip_certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
umask 077
days=2
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days \
	-subj "/CN=cmk_lakebase KMIP test CA" \
	-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
cat > server.ext <<EOT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
EOT
cat > client.ext <<EOT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOT
for who in server client; do
	openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr \
		-subj "/CN=cmk_lakebase KMIP test $who" 2>/dev/null
	openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
		-out $who.pem -days $days -extfile $who.ext 2>/dev/null
	rm -f $who.csr $who.ext
done
# A second CA that signed nothing here: a client trusting it must refuse the server.
openssl req -x509 -newkey rsa:2048 -nodes -keyout other_ca.key -out other_ca.pem -days $days \
	-subj "/CN=cmk_lakebase KMIP unrelated CA" 2>/dev/null
chmod 0644 ca.pem other_ca.pem server.pem client.pem
chmod 0600 ca.key other_ca.key server.key client.key
