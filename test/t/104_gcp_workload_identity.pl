# Google workload identity federation (issue 19) against the loopback Cloud KMS + STS +
# IAM Credentials of test/kms/gcp_kms_server.py (--pool-provider): an external_account
# credential file names a subject token file (an RS256 JWT of the peer's own OIDC
# issuer, verified by the peer with PyJWT) that the provider trades at STS /v1/token
# (RFC 8693, form-encoded, audience = the pool provider) for a federated token, used
# (a) directly on the key, (b) through the file's service_account_impersonation_url,
# (c) through the option impersonate_service_account on top of the federated token.
# Each: pg_cmk initdb, start, write, restart; the audit trail names the identity used.
# The pool provider disabled at the peer (STS: 400 invalid_grant): every cluster is down
# within check_interval + 3 s (latency printed), restart refused; re-enabled: they
# start with nothing lost. No subject token file: an outage, not a revocation. Bad
# external_account files fail with one line naming the field.
#
# Fidelity: TAP 105 runs Google's own client (google-auth's identity_pool
# credentials) against this peer's STS, in the 17/18 matrix (Debian 12's google-auth
# 1.5.1 has no external_account credentials); the unit test
# GcpWorkloadIdentity.StsRequestAgainstThePublishedExample checks the request the
# provider builds against Google's published STS v1 example.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'GCP provider test needs encrypted nodes' if is_plain_mode();
plan skip_all => 'needs /usr/bin/python3 with python3-cryptography and python3-jwt (scripts/install_deps.sh)'
  unless python_has_modules('cryptography', 'jwt');

my $dir      = PostgreSQL::Test::Utils::tempdir('gcp_wif');
my $key      = 'projects/customer-project/locations/global/keyRings/ring/cryptoKeys/lakebase';
my $target   = 'lakebase-cmk@customer-project.iam.gserviceaccount.com';
my $aud      = '//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/lakebase/providers/k8s';
my $interval = 1;
my $peer     = start_kms_peer('gcp_kms_server.py', '--write-credentials', "$dir/sa.json", '--key', $key,
	'--impersonate', $target, '--pool-provider', $aud);
my $subject = "$dir/subject.jwt";
kms_control($peer, action => 'write_subject', path => $subject, sub => 'system:serviceaccount:db:postgres');

sub external_file
{
	my ($name, $extra) = @_;
	return write_secret_file("$dir/$name",
		'{"type":"external_account","audience":"' . $aud . '",'
		  . '"subject_token_type":"urn:ietf:params:oauth:token-type:jwt",'
		  . qq("token_url":"$peer->{url}/v1/token","credential_source":{"file":"$subject","format":{"type":"text"}})
		  . ($extra // '') . '}');
}
my $imp_url = "$peer->{url}/v1/projects/-/serviceAccounts/$target:generateAccessToken";
my %routes = (
	direct => { credentials_file => external_file('direct.json') },
	file_imp => {
		credentials_file => external_file('file_imp.json',
			qq(,"service_account_impersonation_url":"$imp_url","service_account_impersonation":{"token_lifetime_seconds":600}))
	},
	option_imp => {
		credentials_file            => "$dir/direct.json",
		impersonate_service_account => $target,
		iam_credentials_endpoint    => $peer->{url} });
my %as = (
	direct     => "federated principal of $aud",
	file_imp   => "service account $target (impersonated, federated from $aud)",
	option_imp => "service account $target (impersonated, federated from $aud)");

sub initdb_rc
{
	my ($d, %o) = @_;
	return pg_cmk('initdb', '-D', $d, '--provider', 'gcp', '--key-id', $key,
		map({ ('--kms-option', "$_=$o{$_}") } sort keys %o), '--', '-A', 'trust', '-N');
}

# --- configuration errors: one line naming the field, nothing created ------------------
my $n = 0;
for my $case (
	[ 'credential_source.executable', undef,
		qr/is not supported/, '{"executable":{"command":"/bin/true"}}' ],
	[ 'workforce_pool_user_project', external_file('wf.json', ',"workforce_pool_user_project":"p"'), qr/is not supported/ ],
	[ 'credential_source.file', undef, qr/absolute path/, '{"file":"subject.jwt"}' ])
{
	my ($field, $file, $why, $source) = @$case;
	if (defined $source)
	{
		$file = write_secret_file("$dir/src$n.json",
			'{"type":"external_account","audience":"' . $aud . '",'
			  . '"subject_token_type":"urn:ietf:params:oauth:token-type:jwt","credential_source":' . $source . '}');
	}
	my $d = "$dir/bad" . $n++;
	my ($rc, $out, $err) = initdb_rc($d, endpoint => $peer->{url}, credentials_file => $file);
	is($rc, 1, "bad $field: pg_cmk initdb exits 1");
	like($err, qr/\Apg_cmk: error: credentials_file: \Q$field\E in /, "bad $field: the error names the field");
	like($err, $why, "bad $field: and says why");
	is(scalar(() = $err =~ /\n/g), 1, "bad $field: one line");
	ok(!-e "$d/PG_VERSION", "bad $field: no cluster created");
}
{
	my ($rc, $out, $err) = initdb_rc("$dir/both", endpoint => $peer->{url}, %{ $routes{file_imp} },
		impersonate_service_account => $target);
	is($rc, 1, 'the file\'s impersonation and the option together: refused');
	like($err, qr/\Apg_cmk: error: impersonate_service_account: .*remove one of the two/, 'naming the option');
}

# --- each route: initdb, start, write, restart; the audit trail names the identity ------
# Short-lived federated and minted tokens (2 s): the token cache refreshes them at half
# their life, so every watchdog probe exchanges at STS and meets a disabled provider.
kms_control($peer, action => 'sts_ttl',          value => 2);
kms_control($peer, action => 'impersonated_ttl', value => 2);
my %node;
for my $route (sort keys %routes)
{
	my $node = new_encrypted_node("wif_$route", provider => 'gcp', key_id => $key,
		kms_options => { endpoint => $peer->{url}, timeout_ms => 1000, %{ $routes{$route} } },
		check_interval => "${interval}s");
	$node{$route} = $node;
	my $datadir = $node->data_dir;
	my $kr = slurp_file("$datadir/cmk_lakebase/keyring.json");
	unlike($kr, qr/eyJ|ya29\./, "$route: keyring holds no subject token and no access token");
	$node->start;
	$node->safe_psql('postgres',
		"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'wif-' || g FROM generate_series(1, 1000) g;");
	$node->restart;
	is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1000|500500',
		"$route: data intact after a restart through the federated identity");
	my $audit = slurp_file("$datadir/cmk_lakebase/audit.log");
	like($audit, qr/"action":"unwrap"[^\n]*"outcome":"ok"[^\n]*"as":"\Q$as{$route}\E"/,
		"$route: the audit trail records the unwrap as $as{$route}");
	unlike($audit, qr/eyJ|ya29\./, "$route: no token in the audit trail");
}
my $stats = kms_control($peer, action => 'stats');
cmp_ok($stats->{sts_exchanges}, '>=', 6, "the peer's STS verified $stats->{sts_exchanges} subject tokens");
cmp_ok($stats->{minted}, '>=', 2, "and IAM Credentials minted $stats->{minted} tokens of the customer's account");

# --- the pool provider disabled: the kill switch acts through STS --------------------------
sleep 1.5;
$node{$_}->safe_psql('postgres', "INSERT INTO t VALUES (1001, 'before revocation')") for sort keys %node;
my %log_off = map { ($_ => -s $node{$_}->logfile) } keys %node;
my $t0 = Time::HiRes::time();
kms_control($peer, action => 'provider', value => 'off');
for my $route (sort keys %node)
{
	my $waited = wait_for_postmaster_exit($node{$route}, 30);
	my $took = defined $waited ? Time::HiRes::time() - $t0 : undef;
	ok(defined $took, "$route: provider disabled: the postmaster exited");
	cmp_ok($took // 99, '<', $interval + 3,
		sprintf('%s: provider disabled: down in %.2f s < check_interval + 3 s', $route, $took // 99));
	diag(sprintf('revocation latency (%s): %.2f s', $route, $took // 99));
	$node{$route}->_update_pid(0);
	like(slurp_file($node{$route}->logfile, $log_off{$route}), qr/revoked: .*invalid_grant.*workload identity pool or provider/,
		"$route: server log: STS refused the exchange, naming the pool provider");
	my ($started) = try_start($node{$route});
	ok(!$started, "$route: restart refused while the provider is disabled");
	$node{$route}->_update_pid(0);
}
{
	my ($rc) = pg_cmk('status', '-D', $node{direct}->data_dir);
	is($rc, 3, 'pg_cmk status: revoked (exit 3)');
}
kms_control($peer, action => 'provider', value => 'on');
for my $route (sort keys %node)
{
	$node{$route}->start;
	is($node{$route}->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1001|501501',
		"$route: provider re-enabled: the cluster starts with nothing lost");
	$node{$route}->stop;
}

# --- no subject token, or STS down: an outage, not a revocation -------------------------
rename($subject, "$subject.away") or die "rename: $!";
{
	my ($rc, $out, $err) = pg_cmk('status', '-D', $node{direct}->data_dir);
	is($rc, 4, 'no subject token file: pg_cmk status says unavailable (exit 4)');
	like($out . $err, qr/subject token file "\Q$subject\E"/, 'and names the subject token file');
}
rename("$subject.away", $subject) or die "rename: $!";
kms_control($peer, action => 'mode', value => 'error500');
{
	my ($rc) = pg_cmk('status', '-D', $node{file_imp}->data_dir);
	is($rc, 4, 'STS answering 500: unavailable (exit 4)');
}
kms_control($peer, action => 'mode', value => 'normal');
{
	my ($rc) = pg_cmk('status', '-D', $node{file_imp}->data_dir);
	is($rc, 0, 'healthy again: exit 0');
}

done_testing();
