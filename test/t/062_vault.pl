# The Vault / OpenBao Transit key provider end to end, against the loopback Vault of
# test/kms/vault_server.py over TLS (a throwaway CA; ca_file option): pg_cmk initdb
# through Transit, start, write, restart, data intact; every state of the key mapped
# by pg_cmk status to ok (0) / revoked (3) / unavailable (4); the watchdog shutting a
# running server down when access to the key is denied (and not for a sealed Vault);
# bad configurations failing with one line naming the field; AppRole; and hvac
# (python3-hvac, independent code) accepting the same server's answers and
# decrypting the wrapped KEK pg_cmk stored.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Cwd ();
use File::Basename ();
use IPC::Run ();
use Test::More;
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'needs /usr/bin/python3 with python3-cryptography (scripts/install_deps.sh)'
  unless python_has_modules('cryptography');

my $dir = PostgreSQL::Test::Utils::tempdir('vault');
my $token = write_secret_file("$dir/token", 'hvs.root-' . int(rand(1e12)));
my $role  = write_secret_file("$dir/role_id", 'role-' . int(rand(1e9)));
my $secret = write_secret_file("$dir/secret_id", 'secret-' . int(rand(1e12)));
my $role_val   = PostgreSQL::Test::Utils::slurp_file($role)   =~ s/\s+$//r;
my $secret_val = PostgreSQL::Test::Utils::slurp_file($secret) =~ s/\s+$//r;

# A throwaway TLS identity for 127.0.0.1 (self-signed, used as the CA), and for this
# machine's name when it resolves to 127.0.0.1 (the host-name start below).
my $name = loopback_name();
system_or_bail('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
	'-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1' . (defined $name ? ",DNS:$name" : ''),
	'-keyout', "$dir/tls.key", '-out', "$dir/ca.pem");

my $peer = start_kms_peer('vault_server.py', '--token-file', $token, '--key', 'cmk-vault',
	'--namespace', 'team-a', '--role-id', $role_val, '--secret-id', $secret_val,
	'--tls-cert', "$dir/ca.pem", '--tls-key', "$dir/tls.key", '--stall', '5');
my $addr = "https://127.0.0.1:$peer->{port}";
my %opts = (addr => $addr, token_file => $token, namespace => 'team-a',
	ca_file => "$dir/ca.pem", timeout_ms => 1000);

# --- bad configurations: one line naming the field, before any cluster exists --------
my $n = 0;
for my $case (
	[ 'addr',       'cmk-vault', { %opts, addr => 'vault.example.com' } ],
	[ 'key_id',     'a/b',       {%opts} ],
	[ 'ca_file',    'cmk-vault', { %opts, ca_file => "$dir/missing.pem" } ],
	[ 'token_file', 'cmk-vault', { %opts, token_file => "$dir/missing" } ],
	[ 'mount',      'cmk-vault', { %opts, mount => '/x/' } ],
	[ 'secret_id_file', 'cmk-vault', { %opts, token_file => '', role_id_file => $role } ])
{
	my ($field, $key, $o) = @$case;
	delete $o->{token_file} if defined $o->{token_file} && $o->{token_file} eq '';
	my $d = "$dir/bad" . $n++;
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', $d, '--provider', 'vault', '--key-id', $key,
		map({ ('--kms-option', "$_=$o->{$_}") } sort keys %$o), '--', '-A', 'trust', '-N');
	is($rc, 1, "bad $field: pg_cmk initdb exits 1");
	like($err, qr/^pg_cmk: error: .*\b\Q$field\E\b/, "bad $field: the error names $field");
	is(scalar(() = $err =~ /\n/g), 1, "bad $field: the error is one line");
	ok(!-e "$d/PG_VERSION", "bad $field: no cluster was created");
}

# --- initdb through Transit, start, write, restart ----------------------------------
my $node = new_encrypted_node('vault', provider => 'vault', key_id => 'cmk-vault', kms_options => \%opts);
my $keyring = $node->data_dir . '/cmk_lakebase/keyring.json';
like(PostgreSQL::Test::Utils::slurp_file($keyring), qr/"provider":\s*"vault"/, 'keyring names the vault provider');
unlike(PostgreSQL::Test::Utils::slurp_file($keyring), qr/hvs\.root/, 'keyring holds no token');
$node->start;
$node->safe_psql('postgres', q{
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, 'vault-row-' || g FROM generate_series(1, 500) g;
	CHECKPOINT;});
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), max(v) FROM t'), '500|vault-row-99',
	'data intact after a restart through Vault Transit');
like(PostgreSQL::Test::Utils::slurp_file($node->data_dir . '/cmk_lakebase/audit.log'),
	qr/"action":"unwrap".*"request_id":"[0-9a-f]{16}".*"outcome":"ok"/,
	"the audit trail's unwrap rows carry Vault's request_id");
my $reqs = kms_control($peer, action => 'requests')->{requests};
ok((grep { $_->{path} =~ m{^/v1/transit/decrypt/cmk-vault} } @$reqs) >= 2,
	'the server start unwrapped the KEK through /v1/transit/decrypt');
ok(!(grep { ($_->{headers}{'x-vault-namespace'} // '') ne 'team-a' } @$reqs),
	'every request carried X-Vault-Namespace');

# --- fidelity: hvac against the same server ----------------------------------------
SKIP:
{
	skip 'python3-hvac is not installed', 2 unless python_has_modules('hvac');
	my ($out, $err) = ('', '');
	my $script = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/../kms/hvac_check.py');
	my $ok = IPC::Run::run([ '/usr/bin/python3', $script, $addr, $token, 'cmk-vault', '--namespace', 'team-a',
			'--ca', "$dir/ca.pem", '--keyring', $keyring, '--role-id', $role_val, '--secret-id', $secret_val ],
		'>', \$out, '2>', \$err);
	note $out, $err;
	ok($ok, 'hvac: read_key, encrypt/decrypt, rewrap, approle login against the loopback Vault');
	like($out, qr/hvac decrypts the KEK ciphertext pg_cmk stored/, 'hvac decrypts the wrapped KEK pg_cmk stored');
}

# --- every state -> pg_cmk status ---------------------------------------------------
sub status_is
{
	my ($want, $what) = @_;
	my ($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
	is($rc, $want, "$what: pg_cmk status exits $want");
	return "$out$err";
}
status_is(0, 'key usable');
kms_control($peer, action => 'deny', name => 'cmk-vault');
like(status_is(3, 'permission denied (403)'), qr/permission denied/, 'status shows permission denied');
kms_control($peer, action => 'allow', name => 'cmk-vault');
kms_control($peer, action => 'seal');
like(status_is(4, 'Vault sealed (503)'), qr/sealed/, 'status shows the sealed Vault');
kms_control($peer, action => 'unseal');
for my $mode (qw(error500 throttle stall))
{
	kms_control($peer, action => 'mode', value => $mode);
	status_is(4, "server answers $mode");
}
kms_control($peer, action => 'mode', value => 'normal');
kms_control($peer, action => 'revoke_tokens');
status_is(3, 'token revoked (403)');
kms_control($peer, action => 'restore_tokens');
kms_control($peer, action => 'rotate', name => 'cmk-vault');
status_is(0, 'key rotated (v2 latest, v1 still decrypts)');
kms_control($peer, action => 'min_decryption_version', name => 'cmk-vault', value => 2);
like(status_is(3, 'min_decryption_version above our ciphertext'), qr/disallowed by policy/,
	'status says the ciphertext version is disallowed');
kms_control($peer, action => 'min_decryption_version', name => 'cmk-vault', value => 1);
status_is(0, 'min_decryption_version lowered again');

# TLS verification is never off: without the CA file the peer is not trusted.
{
	my $d = "$dir/notrust";
	my %o = %opts;
	delete $o{ca_file};
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', $d, '--provider', 'vault', '--key-id', 'cmk-vault',
		map({ ('--kms-option', "$_=$o{$_}") } sort keys %o), '--', '-A', 'trust', '-N');
	isnt($rc, 0, 'without ca_file the self-signed Vault is not trusted');
	like($err, qr/certificate|SSL|TLS/i, 'the error is about the certificate');
}

# --- watchdog: access denied shuts the running server down; sealed does not ---------
$node->append_conf('postgresql.conf', "cmk_lakebase.check_interval = 1s");
$node->restart;
kms_control($peer, action => 'seal');
sleep 4;
ok(node_is_running($node), 'a sealed Vault (outage) does not stop the server');
kms_control($peer, action => 'unseal');
my $log_off = -s $node->logfile;
kms_control($peer, action => 'deny', name => 'cmk-vault');
my $took = wait_for_postmaster_exit($node, 20);
ok(defined $took, 'the watchdog shut the server down after access was denied' . (defined $took ? " (${took}s)" : ''));
like(PostgreSQL::Test::Utils::slurp_file($node->logfile, $log_off), qr/is revoked/, 'the log says the key is revoked');
$node->{_pid} = undef;
my ($started, $log) = try_start($node);
ok(!$started, 'the server does not start while access is denied');
like($log, qr/FATAL:.*unwrap/, 'the start fails with FATAL about the unwrap');
$node->{_pid} = undef;
kms_control($peer, action => 'allow', name => 'cmk-vault');
start_after_crash($node);
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '500', 'access restored: the cluster starts, data intact');
$node->stop;

# --- AppRole instead of a token ----------------------------------------------------
my $node2 = new_encrypted_node('vault_approle', provider => 'vault', key_id => 'cmk-vault',
	kms_options => { addr => $addr, namespace => 'team-a', ca_file => "$dir/ca.pem",
		role_id_file => $role, secret_id_file => $secret, timeout_ms => 1000 });
$node2->start;
is($node2->safe_psql('postgres', 'SELECT 1'), '1', 'a cluster through AppRole starts');
$node2->stop;
my ($rc) = pg_cmk('status', '-D', $node2->data_dir);
is($rc, 0, 'AppRole: pg_cmk status ok');
kms_control($peer, action => 'expire_secret_id');
($rc) = pg_cmk('status', '-D', $node2->data_dir);
is($rc, 3, 'AppRole: an expired secret id is revoked (exit 3)');

# --- an endpoint named by host name: the postmaster keeps one thread ----------------
# libcurl (Debian's: the threaded resolver) would resolve the name on a thread while the
# postmaster unwraps the KEK, and glibc would treat the postmaster and every process it
# forks as multi-threaded for good (dearer system calls); the name is resolved in a
# child process instead (src/core/kms/http.cpp, resolve_entries).
SKIP:
{
	skip 'this machine\'s host name does not resolve to 127.0.0.1', 4 unless defined $name;
	skip 'gdb is not installed', 4 unless grep { -x "$_/gdb" } split /:/, $ENV{PATH};
	my $node3 = new_encrypted_node('vault_by_name', provider => 'vault', key_id => 'cmk-vault',
		kms_options => { %opts, addr => "https://$name:$peer->{port}" });
	# gdb attaches as the server's OS user: only to a dumpable server.
	$node3->append_conf('postgresql.conf', "cmk_lakebase.allow_core_dumps = on\n");
	$node3->start;
	is($node3->safe_psql('postgres', 'SELECT 1'), '1', "a cluster whose Vault is https://$name:port starts");
	my $bout = '';
	my $bh = IPC::Run::start([ 'psql', '-XAtq', '-h', $node3->host, '-p', $node3->port, '-d', 'postgres',
			'-c', 'SELECT pg_backend_pid()', '-c', 'SELECT pg_sleep(30)' ], '>', \$bout);
	IPC::Run::pump($bh) until $bout =~ /^(\d+)$/m || !$bh->pumpable;
	my $bpid = $1;
	is(single_threaded(postmaster_pid($node3)), 1,
		'the postmaster that unwrapped its KEK through a host name has one thread (__libc_single_threaded)');
	is(single_threaded($bpid // 0), 1, '... and so has a backend it forked');
	$bh->kill_kill;
	my $by_name = grep { $_->{path} =~ m{^/v1/transit/decrypt/cmk-vault} && ($_->{headers}{host} // '') eq "$name:$peer->{port}" }
	  @{ kms_control($peer, action => 'requests')->{requests} };
	ok($by_name > 0, "the unwraps went to $name (Host header)");
	$node3->stop;
}

# --- the key deleted: revoked -------------------------------------------------------
kms_control($peer, action => 'delete_key', name => 'cmk-vault');
like(status_is(3, 'key deleted (404)'), qr/does not exist/, 'status says the key does not exist');

done_testing();
