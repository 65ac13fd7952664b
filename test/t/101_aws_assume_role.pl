# AWS key configuration that assumes the customer's role (issue 19), against the
# loopback AWS peer (test/kms/aws_kms_server.py): its STS AssumeRole verifies the SigV4
# signature with botocore, checks the role, the ExternalId of the trust policy, the
# session name and duration, and issues session credentials the KMS calls must carry.
# pg_cmk initdb --kms-option assume_role_arn=... external_id=..., start, write, restart
# through the assumed role; the audit trail says each KMS call ran "as" the session;
# the trust withdrawn at the peer: the watchdog's refresh meets AccessDenied and the
# cluster is down within check_interval + 3 s, restart refused, trust restored: starts
# with nothing lost; the trust withdrawn and the active sessions revoked (long
# sessions, cached): the next KMS call meets AccessDeniedException, down within
# check_interval + 3 s; an STS outage is an outage (exit 4), not a revocation; the
# operator's keys from a profile's credential_process (a failing helper: an outage); bad
# options fail with one line naming the field; botocore's STS client signs an
# AssumeRole to the peer and parses its answer.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run ();
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'AWS provider test needs encrypted nodes' if is_plain_mode();
if (!python_has_modules('botocore.auth', 'cryptography'))
{
	BAIL_OUT('python3-botocore / python3-cryptography missing (scripts/install_deps.sh)')
	  if $ENV{CI} || $ENV{CMK_REQUIRE_KMS_TESTS};
	plan skip_all => 'python3-botocore not installed';
}

my $kmsdir   = abs_path(dirname(__FILE__) . '/../kms');
my $akid     = 'AKIDCMKOPERATOR';
my $secret   = 'operator-secret-' . int(rand(1_000_000_000));
my $role_arn = 'arn:aws:iam::111122223333:role/customer-kms';
my $ext_id   = 'lakebase-ws-' . int(rand(1_000_000));
my $session  = 'arn:aws:sts::111122223333:assumed-role/customer-kms/cmk_lakebase';
my $interval = 1;

# Sessions live 300 s: within the chain's 300 s refresh margin from the start, so every
# watchdog probe refreshes them and a withdrawn trust is met at the next probe.
my $peer = start_kms_peer('aws_kms_server.py', '--cred', "$akid:$secret", '--assume-role', $role_arn,
	'--external-id', $ext_id, '--sts-expiry', '300', '--parent-pid', $$);
my $url  = $peer->{url};

sub control { return aws_control($url, @_) }

control('create_key', { alias => 'alias/customer' });

# Base credentials of the operator: the environment only.
my $tmp = PostgreSQL::Test::Utils::tempdir('aws_role');
aws_env_keys_only($tmp, $akid, $secret);

my @kms_options = (
	"endpoint=$url", 'region=us-east-1', "sts_endpoint=$url", 'timeout_ms=2000', 'retries=2',
	"assume_role_arn=$role_arn", "external_id=$ext_id");

# --- initdb, start, write, restart through the assumed role ---------------------------
my $node = new_encrypted_node(
	'aws_role',
	provider       => 'aws',
	key_id         => 'alias/customer',
	kms_options    => \@kms_options,
	check_interval => "${interval}s");
my $datadir = $node->data_dir;
my $keyring = slurp_file("$datadir/cmk_lakebase/keyring.json");
like($keyring, qr/"assume_role_arn"\s*:\s*"\Q$role_arn\E"/, 'keyring keeps the role to assume');
like($keyring, qr/"external_id"\s*:\s*"\Q$ext_id\E"/,       'keyring keeps the external id');
unlike($keyring, qr/\Q$secret\E/, 'no secret in the keyring');

$node->start;
$node->safe_psql('postgres',
	"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'role-' || g FROM generate_series(1, 1000) g;");
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1000|500500',
	'data intact after a restart through the assumed role');
my $stats = control('stats');
cmp_ok($stats->{assume_role}, '>=', 2, "the peer issued $stats->{assume_role} AssumeRole sessions");
is($stats->{assume_role_denied}, 0, 'and refused none');

my $audit = slurp_file("$datadir/cmk_lakebase/audit.log");
like($audit, qr/"action":"unwrap"[^\n]*"outcome":"ok"[^\n]*"as":"\Q$session\E"/,
	'the audit trail records the unwrap as the assumed role session');
like($audit, qr/"action":"status"[^\n]*"as":"\Q$session\E"/, 'and the status probes too');
unlike($audit, qr/\Q$secret\E/, 'no secret in the audit trail');

# --- the trust withdrawn: the watchdog's refresh meets AccessDenied --------------------
sleep 1.5;    # a few probes on the healthy role
$node->safe_psql('postgres', "INSERT INTO t VALUES (1001, 'before revocation')");
my $log_offset = -s $node->logfile;
control('role', { trust => JSON::PP::false });
my $latency = wait_for_postmaster_exit($node, 30);
ok(defined $latency, 'trust withdrawn: the postmaster exited');
cmp_ok($latency // 99, '<', $interval + 3,
	sprintf('trust withdrawn: down in %.2f s < check_interval + 3 s', $latency // 99));
$node->_update_pid(0);
like(slurp_file($node->logfile, $log_offset), qr/revoked: .*AssumeRole.*AccessDenied/,
	'server log: the AssumeRole refresh was refused (AccessDenied)');

my ($started, $log) = try_start($node);
ok(!$started, 'restart refused while the role does not trust us');
like($log, qr/AccessDenied/, 'the refusal names AccessDenied');
$node->_update_pid(0);
{
	my ($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
	is($rc, 3, 'pg_cmk status: revoked (exit 3)');
}

control('role', { trust => JSON::PP::true });
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1001|501501',
	'trust restored: the cluster starts with nothing lost');

# --- long sessions (cached), trust withdrawn and the active sessions revoked -------------
control('role', { expiry => 0 });    # sessions live as long as asked (3600 s)
$node->restart;
sleep 1.5;
$stats = control('stats');
my $issued = $stats->{assume_role};
sleep 2;
is(control('stats')->{assume_role}, $issued, 'one-hour sessions are cached: no AssumeRole at each probe');
$node->safe_psql('postgres', "INSERT INTO t VALUES (1002, 'before session revocation')");
control('role', { trust => JSON::PP::false, revoke_sessions => JSON::PP::true });
$latency = wait_for_postmaster_exit($node, 30);
cmp_ok($latency // 99, '<', $interval + 3,
	sprintf('sessions revoked: down in %.2f s < check_interval + 3 s', $latency // 99));
$node->_update_pid(0);
($started) = try_start($node);
ok(!$started, 'restart refused');
$node->_update_pid(0);
control('role', { trust => JSON::PP::true });
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1002|502503',
	'trust restored again: nothing lost');
$node->stop;

# --- an STS outage is an outage, not a revocation ----------------------------------------
control('fail', { mode => 'sts_500' });
{
	my ($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
	is($rc, 4, 'STS answering 500: pg_cmk status says unavailable (exit 4)');
	like("$out$err", qr/AssumeRole.*HTTP 500/, 'and names the AssumeRole call');
}
control('fail', { mode => 'none' });

# --- configuration errors: one line naming the field; the wrong external id ----------------
for my $case (
	[ 'malformed role ARN', [ 'assume_role_arn=arn:aws:iam::1:role/x' ], 1, qr/\Apg_cmk: error: assume_role_arn: / ],
	[ 'external id too short', [ 'external_id=x' ], 1, qr/\Apg_cmk: error: external_id: / ],
	[ 'duration out of range', [ 'assume_role_duration=60' ], 1, qr/\Apg_cmk: error: assume_role_duration: / ],
	[ 'wrong external id', [ 'external_id=not-the-customers' ], 3, qr/AccessDenied/ ])
{
	my ($label, $opts, $want, $pattern) = @$case;
	my %o = map { split /=/, $_, 2 } (@kms_options, @$opts);
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', "$tmp/bad", '--provider', 'aws', '--key-id', 'alias/customer',
		map { ('--kms-option', "$_=$o{$_}") } sort keys %o);
	is($rc, $want, "$label: initdb exits $want");
	like($err, $pattern, "$label: the error says why");
	is(scalar(() = $err =~ /\n/g), 1, "$label: one line");
	ok(!-e "$tmp/bad/PG_VERSION", "$label: no cluster created");
}

# --- the operator's base credentials from a profile's credential_process -----------------
# The helper prints the operator's keys (and counts its runs); the server runs it, then
# assumes the customer's role from them. A helper that fails is an outage (exit 4).
{
	local %ENV = %ENV;
	my $runs   = "$tmp/helper.runs";
	my $helper = "$tmp/creds helper.sh";    # a space: the command line is quoted
	my $write_helper = sub {
		my ($body) = @_;
		open(my $fh, '>', $helper) or die "$helper: $!";
		print $fh "#!/bin/sh\necho run >> '$runs'\n$body";
		close $fh;
		chmod 0700, $helper;
	};
	$write_helper->(qq{printf '{"Version": 1, "AccessKeyId": "%s", "SecretAccessKey": "%s"}' '$akid' '$secret'\n});
	open(my $cf, '>', "$tmp/aws_config") or die;
	print $cf "[profile operator]\ncredential_process = \"$helper\" --for cmk_lakebase\n";
	close $cf;
	delete $ENV{$_} for qw(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY);
	$ENV{AWS_CONFIG_FILE} = "$tmp/aws_config";
	$ENV{AWS_PROFILE}     = 'operator';

	my $pnode = new_encrypted_node(
		'aws_process',
		provider       => 'aws',
		key_id         => 'alias/customer',
		kms_options    => \@kms_options,
		check_interval => "${interval}s");
	$pnode->start;
	$pnode->safe_psql('postgres', "CREATE TABLE p AS SELECT g AS id FROM generate_series(1, 100) g");
	$pnode->restart;
	is($pnode->safe_psql('postgres', 'SELECT count(*), sum(id) FROM p'), '100|5050',
		'credential_process as the base of the role chain: initdb, start, restart');
	ok(-s $runs, 'the server ran the helper');
	my ($rc, $out, $err) = pg_cmk('status', '-D', $pnode->data_dir);
	is($rc, 0, 'pg_cmk status through credential_process: ok') or diag("$out$err");

	$write_helper->("echo 'secret-on-stderr' >&2\nexit 7\n");
	($rc, $out, $err) = pg_cmk('status', '-D', $pnode->data_dir);
	is($rc, 4, 'a failing credential_process: unavailable (exit 4), not revoked');
	like("$out$err", qr/credential_process of profile "operator".*exited with status 7/,
		'the error names the profile and the exit status');
	unlike("$out$err", qr/secret-on-stderr/, 'and does not copy the helper\'s standard error');
	$pnode->stop;

	open($cf, '>', "$tmp/aws_config") or die;
	print $cf "[profile operator]\ncredential_process = creds-helper --for cmk_lakebase\n";
	close $cf;
	($rc, $out, $err) = pg_cmk('initdb', '-D', "$tmp/badproc", '--provider', 'aws', '--key-id', 'alias/customer',
		map { ('--kms-option', $_) } @kms_options);
	is($rc, 1, 'credential_process without an absolute path: initdb fails');
	like($err, qr/\Apg_cmk: error: profile: profile "operator" credential_process: .*not an absolute path/,
		'one line naming the profile and why');
}

# --- botocore's STS client against the peer ---------------------------------------------------
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ '/usr/bin/python3', "$kmsdir/aws_botocore_sts.py", $url, 'us-east-1', $akid, $secret,
			$role_arn, $ext_id, 'alias/customer' ], '<', \undef, '>', \$out, '2>', \$err);
	ok($ok, 'botocore signs AssumeRole to the peer and parses its answer') or diag("$out\n$err");
	like($out, qr/ok wrong ExternalId refused: AccessDenied/, 'botocore sees the wrong ExternalId refused');
}

$stats = control('stats');
is($stats->{bad_signatures}, 0, 'the peer verified every signature (KMS and STS) with botocore')
  or diag($stats->{last_auth_error});

done_testing();
