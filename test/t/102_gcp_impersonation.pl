# Google key configuration that impersonates the customer's service account (issue 19),
# against the loopback Cloud KMS + IAM Credentials of test/kms/gcp_kms_server.py: the
# operator's service-account key file (JWT checked with PyJWT) gives a cloud-platform
# token, traded by generateAccessToken for a token of the customer's account, the only
# one the key admits. pg_cmk initdb --kms-option impersonate_service_account=...,
# start, write, restart; the audit trail says each KMS call ran as the impersonated
# account; the token creator binding removed at the peer: the watchdog's refresh meets
# PERMISSION_DENIED and the cluster is down within check_interval + 3 s, restart
# refused, binding restored: starts with nothing lost; the minted tokens revoked too
# (account disabled, long-lived tokens): down within check_interval + 3 s; an outage of
# the endpoints is an outage; bad options fail with one line naming the field; an
# external_account (workload identity federation) file is refused as not supported.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'GCP provider test needs encrypted nodes' if is_plain_mode();
plan skip_all => 'needs /usr/bin/python3 with python3-cryptography and python3-jwt (scripts/install_deps.sh)'
  unless python_has_modules('cryptography', 'jwt');

my $dir      = PostgreSQL::Test::Utils::tempdir('gcp_imp');
my $key      = 'projects/customer-project/locations/global/keyRings/ring/cryptoKeys/lakebase';
my $target   = 'lakebase-cmk@customer-project.iam.gserviceaccount.com';
my $interval = 1;
my $peer     = start_kms_peer('gcp_kms_server.py', '--write-credentials', "$dir/sa.json", '--key', $key,
	'--impersonate', $target);
my %opts = (
	endpoint                    => $peer->{url},
	credentials_file            => "$dir/sa.json",
	impersonate_service_account => $target,
	iam_credentials_endpoint    => $peer->{url},
	timeout_ms                  => 1000);

sub initdb_rc
{
	my ($d, %o) = @_;
	return pg_cmk('initdb', '-D', $d, '--provider', 'gcp', '--key-id', $key,
		map({ ('--kms-option', "$_=$o{$_}") } sort keys %o), '--', '-A', 'trust', '-N');
}

# --- configuration errors; the operator's own account is refused by the key ------------
write_secret_file("$dir/wif.json",
	'{"type":"external_account","audience":"//iam.googleapis.com/projects/1/locations/global/'
	  . 'workloadIdentityPools/p/providers/x","subject_token_type":"urn:ietf:params:oauth:token-type:jwt",'
	  . '"token_url":"https://sts.googleapis.com/v1/token","credential_source":{"executable":{"command":"/bin/true"}}}');
my $n = 0;
for my $case (
	[ 'impersonate_service_account', { %opts, impersonate_service_account => 'lakebase-cmk' }, qr/is not a service-account e-mail/ ],
	[ 'impersonation_lifetime', { %opts, impersonation_lifetime => '30' }, qr/from 300 to 43200/ ],
	[ 'iam_credentials_endpoint', { %opts, iam_credentials_endpoint => 'http://iam.example.com' }, qr/https/ ],
	[ 'credentials_file', { %opts, credentials_file => "$dir/wif.json" }, qr/credential_source\.executable in .*is not supported/ ])
{
	my ($field, $o, $why) = @$case;
	my $d = "$dir/bad" . $n++;
	my ($rc, $out, $err) = initdb_rc($d, %$o);
	is($rc, 1, "bad $field: pg_cmk initdb exits 1");
	like($err, qr/\Apg_cmk: error: \Q$field\E: /, "bad $field: the error starts with the field");
	like($err, $why, "bad $field: and says why");
	is(scalar(() = $err =~ /\n/g), 1, "bad $field: one line");
	ok(!-e "$d/PG_VERSION", "bad $field: no cluster created");
}
{
	my %own = %opts;
	delete @own{qw(impersonate_service_account iam_credentials_endpoint)};
	my ($rc, $out, $err) = initdb_rc("$dir/own", %own);
	is($rc, 3, "without impersonation the customer's key refuses the operator's account (exit 3)");
	like($err, qr/PERMISSION_DENIED/, 'and says PERMISSION_DENIED');
}

# --- initdb, start, write, restart as the customer's account --------------------------------
# Minted tokens live 2 s: the token cache refreshes them at half their life, so every
# watchdog probe mints one and meets a removed binding at once.
kms_control($peer, action => 'impersonated_ttl', value => 2);
my $node = new_encrypted_node('gcp_imp', provider => 'gcp', key_id => $key, kms_options => \%opts,
	check_interval => "${interval}s");
my $datadir = $node->data_dir;
my $kr = slurp_file("$datadir/cmk_lakebase/keyring.json");
like($kr, qr/"impersonate_service_account":\s*"\Q$target\E"/, 'keyring keeps the account to impersonate');
unlike($kr, qr/PRIVATE KEY|ya29\./, 'keyring holds no private key and no token');
$node->start;
$node->safe_psql('postgres',
	"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'imp-' || g FROM generate_series(1, 1000) g;");
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1000|500500',
	'data intact after a restart as the impersonated account');
my $audit = slurp_file("$datadir/cmk_lakebase/audit.log");
like($audit, qr/"action":"unwrap"[^\n]*"outcome":"ok"[^\n]*"as":"service account \Q$target\E \(impersonated\)"/,
	'the audit trail records the unwrap as the impersonated account');
unlike($audit, qr/ya29\.|PRIVATE KEY/, 'no token or key in the audit trail');
my $stats = kms_control($peer, action => 'stats');
cmp_ok($stats->{minted}, '>=', 2, "the peer minted $stats->{minted} tokens of the customer's account");

# --- the token creator binding removed: the refresh meets PERMISSION_DENIED --------------
sleep 1.5;
$node->safe_psql('postgres', "INSERT INTO t VALUES (1001, 'before revocation')");
my $log_off = -s $node->logfile;
kms_control($peer, action => 'token_creator', value => 'off');
my $took = wait_for_postmaster_exit($node, 30);
ok(defined $took, 'binding removed: the postmaster exited');
cmp_ok($took // 99, '<', $interval + 3, sprintf('binding removed: down in %.2f s < check_interval + 3 s', $took // 99));
$node->_update_pid(0);
like(slurp_file($node->logfile, $log_off), qr/revoked: .*iam\.serviceAccounts\.getAccessToken/,
	'server log: generateAccessToken was refused');
my ($started, $log) = try_start($node);
ok(!$started, 'restart refused while the binding is removed');
$node->_update_pid(0);
{
	my ($rc) = pg_cmk('status', '-D', $datadir);
	is($rc, 3, 'pg_cmk status: revoked (exit 3)');
}
kms_control($peer, action => 'token_creator', value => 'on');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1001|501501',
	'binding restored: the cluster starts with nothing lost');

# --- long-lived tokens, account cut off (tokens revoked and binding removed) --------------
kms_control($peer, action => 'impersonated_ttl', value => 0);
$node->restart;
sleep 1.5;
$stats = kms_control($peer, action => 'stats');
sleep 2;
is(kms_control($peer, action => 'stats')->{minted}, $stats->{minted}, 'one-hour tokens are cached between probes');
$node->safe_psql('postgres', "INSERT INTO t VALUES (1002, 'before cut-off')");
kms_control($peer, action => 'token_creator', value => 'off');
kms_control($peer, action => 'revoke_tokens');
$took = wait_for_postmaster_exit($node, 30);
cmp_ok($took // 99, '<', $interval + 3, sprintf('tokens revoked: down in %.2f s < check_interval + 3 s', $took // 99));
$node->_update_pid(0);
($started) = try_start($node);
ok(!$started, 'restart refused');
$node->_update_pid(0);
kms_control($peer, action => 'token_creator', value => 'on');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1002|502503', 'restored again: nothing lost');
$node->stop;

# --- an outage is an outage -----------------------------------------------------------------
kms_control($peer, action => 'mode', value => 'error500');
{
	my ($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
	is($rc, 4, 'endpoints answering 500: pg_cmk status says unavailable (exit 4)');
}
kms_control($peer, action => 'mode', value => 'normal');
{
	my ($rc) = pg_cmk('status', '-D', $datadir);
	is($rc, 0, 'healthy again: exit 0');
}

done_testing();
