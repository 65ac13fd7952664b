# Fidelity of the loopback Google peer (issue 19): Google's own Python client,
# google-auth, against test/kms/gcp_kms_server.py, the peer TAP 063, 102 and 104 and the
# GcpLoopback unit tests run the gcp provider against. google-auth signs the service
# account's JWT bearer grant, impersonates the customer's service account through IAM
# Credentials generateAccessToken, exchanges a workload identity federation subject
# token at STS (directly and with the file's service-account impersonation URL), and
# uses every token on Cloud KMS encrypt/decrypt; the peer checks each request as it
# checks the provider's, google-auth parses each answer. The peer's refusals (token
# creator binding removed, pool provider disabled or unknown) reach google-auth as
# Google's errors. Debian 12's python3-google-auth (1.5.1) has neither impersonated nor
# external_account credentials: this file runs in the PostgreSQL 17 and 18 matrix
# (Debian 13's google-auth 2.28, sid's 2.48; scripts/pg_rootfs.sh) and skips on 15.
#
# What it found, fixed in the peer and the provider: the JWT bearer grant's "aud" is
# always https://oauth2.googleapis.com/token (the provider sent token_uri, which only a
# test peer tells apart); generateAccessToken and STS take the iam scope (google-auth's
# impersonation source asks for it); "delegates": null means none; a projected subject
# token file has no trailing newline.

use strict;
use warnings;

use Cwd qw(abs_path);
use IPC::Run ();
use File::Basename qw(dirname);
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'needs /usr/bin/python3 with python3-cryptography and python3-jwt (scripts/install_deps.sh)'
  unless python_has_modules('cryptography', 'jwt');
plan skip_all => 'python3-google-auth without impersonated and external_account credentials '
  . '(Debian 12 ships 1.5.1; the PostgreSQL 17/18 matrix runs this with Debian 13+\'s 2.x)'
  unless python_has_modules('google.auth.impersonated_credentials', 'google.auth.identity_pool', 'requests');

my $kmsdir = abs_path(dirname(__FILE__) . '/../kms');
my $dir    = PostgreSQL::Test::Utils::tempdir('gcp_google_auth');
my $key    = 'projects/customer-project/locations/global/keyRings/ring/cryptoKeys/lakebase';
my $target = 'lakebase-cmk@customer-project.iam.gserviceaccount.com';
my $aud    = '//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/lakebase/providers/k8s';
my $peer   = start_kms_peer('gcp_kms_server.py', '--write-credentials', "$dir/sa.json", '--key', $key,
	'--impersonate', $target, '--pool-provider', $aud);
kms_control($peer, action => 'write_subject', path => "$dir/subject.jwt", sub => 'system:serviceaccount:db:postgres');

my ($out, $err) = ('', '');
my $ok = IPC::Run::run(
	[ '/usr/bin/python3', "$kmsdir/gcp_google_auth.py", $peer->{url}, "$dir/sa.json", $key, $target,
		$aud, "$dir/subject.jwt" ],
	'<', \undef, '>', \$out, '2>', \$err);
note $out;
ok($ok, 'google-auth: every check against the peer passes') or diag("$out\n$err");
my ($version) = $out =~ /^google-auth (\S+)$/m;
note 'google-auth ' . ($version // '?');

for my $check (
	[ qr/^ok service-account JWT bearer grant/m,                    'JWT bearer grant: the peer verifies google-auth\'s assertion' ],
	[ qr/^ok the operator's own token is refused/m,                  'the operator\'s own token is refused by the key' ],
	[ qr/^ok generateAccessToken: minted for \Q$target\E/m,          'generateAccessToken: google-auth parses the minted token' ],
	[ qr/^ok impersonated token: encrypt \+ decrypt/m,               'the impersonated token encrypts and decrypts' ],
	[ qr/^ok token creator binding removed: .*PERMISSION_DENIED/m,   'binding removed: google-auth sees PERMISSION_DENIED' ],
	[ qr/^ok STS token exchange/m,                                   'STS: the peer takes google-auth\'s token exchange' ],
	[ qr/^ok federated token, on the key directly: encrypt/m,        'the federated token encrypts and decrypts' ],
	[ qr/^ok federated token impersonating \Q$target\E: encrypt/m,  'federated + impersonation URL: encrypts and decrypts' ],
	[ qr/^ok pool provider disabled: .*invalid_grant/m,              'provider disabled: google-auth sees invalid_grant' ],
	[ qr/^ok unknown pool provider: .*invalid_target/m,              'unknown provider: google-auth sees invalid_target' ])
{
	like($out, $check->[0], $check->[1]);
}

# The peer's own count: what google-auth sent was checked, not waved through.
my $stats = kms_control($peer, action => 'stats');
cmp_ok($stats->{verified_assertions}, '>=', 1, 'the peer verified a JWT assertion with PyJWT');
cmp_ok($stats->{minted},              '>=', 2, 'the peer minted impersonated tokens');
cmp_ok($stats->{mint_denied},         '>=', 1, 'and refused one without the binding');
cmp_ok($stats->{sts_exchanges},       '>=', 2, 'the peer exchanged federated tokens');
cmp_ok($stats->{sts_refused},         '>=', 2, 'and refused the disabled and the unknown provider');

done_testing();
