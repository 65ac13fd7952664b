# AWS KMS provider end to end, against the loopback AWS KMS test server
# (test/kms/aws_kms_server.py), which verifies the SigV4 signature of every request
# with botocore and refuses a bad one. pg_cmk initdb --provider aws, start, write,
# restart, data intact; pg_cmk status says revoked (exit 3) for a disabled key, a key
# pending deletion, a denied key policy (on every call, and on Decrypt only: the unwrap
# probe), a destroyed key; unavailable (exit 4) for 500, throttling, a stalled and a
# stopped server; the watchdog (check_interval 1s) shuts a running server down when
# the key is disabled; credentials from a shared credentials file profile, a web
# identity token (STS) and IMDSv2; bad configurations fail with one line naming the
# field; botocore's own KMS client parses the server's answers; and at the end the
# server has verified every request and seen no bad signature but the deliberate one.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run ();
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'AWS provider test needs encrypted nodes' if is_plain_mode();

my $python = '/usr/bin/python3';
if (system("$python -c 'import botocore.auth, cryptography' >/dev/null 2>&1") != 0)
{
	BAIL_OUT('python3-botocore / python3-cryptography missing (scripts/install_deps.sh)')
	  if $ENV{CI} || $ENV{CMK_REQUIRE_KMS_TESTS};
	plan skip_all => 'python3-botocore not installed';
}

my $kmsdir   = abs_path(dirname(__FILE__) . '/../kms');
my $tmp      = PostgreSQL::Test::Utils::tempdir('aws');
my $akid     = 'AKIDCMKTAPTEST';
my $secret   = 'tap-secret-' . int(rand(1_000_000_000));
my $role_arn = 'arn:aws:iam::111122223333:role/cmk-tap';
my $jwt      = 'eyJhbGciOiJSUzI1NiJ9.tap.' . int(rand(1_000_000_000));

# --- the server ---------------------------------------------------------------------
my $port_file = "$tmp/port";
my $server = IPC::Run::start(
	[
		$python,        "$kmsdir/aws_kms_server.py",
		'--port-file',  $port_file,
		'--cred',       "$akid:$secret",
		'--role-arn',   $role_arn,
		'--web-identity-token', $jwt,
		'--imds-role',  'cmk-tap-instance',
		'--stall-seconds', '15',
		'--parent-pid', $$,
		'--lifetime',   '900'
	],
	'<', \undef, '>', "$tmp/server.log", '2>&1');
for (1 .. 100) { last if -s $port_file; select(undef, undef, undef, 0.1) }
BAIL_OUT('AWS KMS test server did not start: ' . slurp_file("$tmp/server.log"))
  unless -s $port_file;
my $port = slurp_file($port_file);
chomp $port;
my $url  = "http://127.0.0.1:$port";

sub control { return aws_control($url, @_) }

my $key = control('create_key', { alias => 'alias/cmk-tap' });
my $kid = $key->{KeyId};
note "key $key->{Arn}";

# --- credentials: only what each case gives -----------------------------------------
aws_env_keys_only($tmp, $akid, $secret);

my @kms_options = (
	"endpoint=$url", 'region=us-east-1', "sts_endpoint=$url",
	'timeout_ms=2000', 'retries=2', 'encryption_context=cluster=tap');

# --- initdb, start, write, restart --------------------------------------------------
my $node = new_encrypted_node(
	'aws',
	provider    => 'aws',
	key_id      => 'alias/cmk-tap',
	kms_options => \@kms_options);
my $datadir = $node->data_dir;
my $keyring = slurp_file("$datadir/cmk_lakebase/keyring.json");
like($keyring, qr/"provider"\s*:\s*"aws"/, 'keyring names the aws provider');
like($keyring, qr/"endpoint"\s*:\s*"\Q$url\E"/, 'keyring keeps the endpoint option');
unlike($keyring, qr/\Q$secret\E/, 'no secret in the keyring');

$node->start;
$node->safe_psql('postgres',
	"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'aws-' || g FROM generate_series(1, 500) g;"
);
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '500|125250', 'data intact after restart');
like(slurp_file("$datadir/cmk_lakebase/audit.log"),
	qr/"action":"unwrap".*"request_id":"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".*"outcome":"ok"/,
	"the audit trail's unwrap rows carry AWS's x-amzn-RequestId");

sub status_rc
{
	my ($label, $want, $pattern) = @_;
	my ($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
	is($rc, $want, "$label: pg_cmk status exit $want");
	like("$out$err", $pattern, "$label: status says why") if $pattern;
	unlike("$out$err", qr/\Q$secret\E/, "$label: no secret in the output");
	return "$out$err";
}

status_rc('enabled key', 0, qr/key_state: ok \(Enabled/);

# --- the watchdog: disabling the key shuts the running server down ------------------
$node->append_conf('postgresql.conf', "cmk_lakebase.check_interval = '1s'");
$node->reload;
sleep 2;
ok(node_is_running($node), 'server running with check_interval 1s');
my $log_offset = -s $node->logfile;
control('set', { key => $kid, state => 'Disabled' });
my $down = 0;
for (1 .. 60)
{
	if (!node_is_running($node)) { $down = 1; last }
	sleep 1;
}
ok($down, 'watchdog shut the server down after the key was disabled');
$node->_update_pid(0);
my $wlog = slurp_file($node->logfile, $log_offset);
like($wlog, qr/key "alias\/cmk-tap" of provider "aws" is revoked: .*Disabled/,
	'server log says the AWS key is revoked (Disabled)');

my ($started) = try_start($node);
ok(!$started, 'server refuses to start while the key is disabled');
$node->_update_pid(0);
control('set', { key => $kid, state => 'Enabled' });
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '500', 'key re-enabled: server starts, data intact');
$node->stop;

# --- key states -> revoked ------------------------------------------------------------
for my $state ('Disabled', 'PendingDeletion', 'PendingImport')
{
	control('set', { key => $kid, state => $state });
	status_rc("KeyState $state", 3, qr/revoked \($state/);
}
control('set', { key => $kid, state => 'Enabled' });
control('set', { key => $kid, deny => [ 'DescribeKey', 'Encrypt', 'Decrypt' ] });
status_rc('access denied', 3, qr/revoked .*AccessDeniedException/);
control('set', { key => $kid, deny => ['Decrypt'] });
status_rc('Decrypt denied (revoked grant)', 3, qr/revoked \(unwrap failed: .*AccessDeniedException/);
control('set', { key => $kid, deny => [] });
status_rc('access restored', 0);

# --- transient answers -> unavailable -------------------------------------------------
for my $mode ('500', 'throttle', 'stall')
{
	control('fail', { mode => $mode });
	my $t0 = time;
	status_rc("server answers $mode", 4, qr/unavailable/);
	cmp_ok(time - $t0, '<', 30, "$mode: status returns within its timeouts");
}
control('fail', { mode => 'none' });
status_rc('server healthy again', 0);

# --- a bad signature is refused by the server's botocore check ------------------------
control('reset_stats');
{
	local $ENV{AWS_SECRET_ACCESS_KEY} = 'not-the-secret';
	status_rc('wrong secret key (bad signature)', 4, qr/InvalidSignatureException/);
}
my $stats = control('stats');
cmp_ok($stats->{bad_signatures}, '>=', 1, 'server counted the bad signature');
is($stats->{verified}, 0, 'and verified none of those requests');
control('reset_stats');

# --- credentials chain ------------------------------------------------------------------
{
	local $ENV{AWS_ACCESS_KEY_ID};
	local $ENV{AWS_SECRET_ACCESS_KEY};
	delete $ENV{AWS_ACCESS_KEY_ID};
	delete $ENV{AWS_SECRET_ACCESS_KEY};

	my $creds = "$tmp/credentials";
	open(my $fh, '>', $creds) or die $!;
	print $fh "[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n"
	  . "[cmk-tap]\naws_access_key_id = $akid\naws_secret_access_key = $secret\n";
	close $fh;
	chmod 0600, $creds;

	# a second cluster whose keyring names the profile and the file
	my $node2 = new_encrypted_node(
		'aws_profile',
		provider    => 'aws',
		key_id      => $key->{Arn},
		kms_options => [ @kms_options, 'profile=cmk-tap', "shared_credentials_file=$creds" ]);
	$node2->start;
	is($node2->safe_psql('postgres', 'SELECT 1'), '1', 'cluster with shared credentials file profile runs');
	$node2->stop;

	local $ENV{AWS_SHARED_CREDENTIALS_FILE} = $creds;
	{
		local $ENV{AWS_PROFILE} = 'cmk-tap';
		status_rc('shared credentials file, AWS_PROFILE=cmk-tap', 0);
	}
	status_rc('shared credentials file, default profile (wrong keys)', 3, qr/UnrecognizedClientException/);
	{
		local $ENV{AWS_PROFILE} = 'nobody';
		my ($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
		is($rc, 1, 'unknown profile: configuration error');
		like($err, qr/^pg_cmk: error: .*profile: no credentials for profile "nobody"/m,
			'unknown profile: error names the profile');
	}
	$ENV{AWS_SHARED_CREDENTIALS_FILE} = "$tmp/absent";

	my $tokfile = "$tmp/token";
	open($fh, '>', $tokfile) or die $!;
	print $fh "$jwt\n";
	close $fh;
	{
		local $ENV{AWS_WEB_IDENTITY_TOKEN_FILE} = $tokfile;
		local $ENV{AWS_ROLE_ARN}                = $role_arn;
		status_rc('web identity token file (STS AssumeRoleWithWebIdentity)', 0);
		local $ENV{AWS_ROLE_ARN} = 'arn:aws:iam::111122223333:role/other';
		status_rc('web identity for a role that does not trust us', 3, qr/AccessDenied/);
	}
	{
		local $ENV{AWS_EC2_METADATA_DISABLED}         = 'false';
		local $ENV{AWS_EC2_METADATA_SERVICE_ENDPOINT} = $url;
		status_rc('IMDSv2 instance credentials', 0);
	}
	$stats = control('stats');
	cmp_ok($stats->{sts},  '>=', 1, 'the server issued STS credentials');
	cmp_ok($stats->{imds}, '>=', 1, 'the server issued IMDS credentials');
	cmp_ok($stats->{unknown_keys}, '>=', 1, 'the server refused the unknown access key of [default]');

	# missing credentials: one line naming what is missing
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', "$tmp/nocreds", '--provider', 'aws', '--key-id', 'alias/cmk-tap',
		map { ('--kms-option', $_) } @kms_options);
	is($rc, 1, 'initdb without credentials fails');
	like($err, qr/\Apg_cmk: error: credentials: no AWS credentials found \(AWS_ACCESS_KEY_ID/,
		'missing credentials: error names them');
	is(scalar(() = $err =~ /\n/g), 1, 'missing credentials: one line');
	ok(!-e "$tmp/nocreds/PG_VERSION", 'missing credentials: no cluster created');
}

# --- bad configuration -------------------------------------------------------------------
for my $case (
	[ 'malformed region', [ 'region=us-east-one' ],          'alias/cmk-tap', qr/region: "us-east-one" is not/ ],
	[ 'missing CA file',  [ "ca_file=$tmp/no-ca.pem" ],      'alias/cmk-tap', qr/ca_file: cannot read/ ],
	[ 'malformed key id', [],                                'key/bad',       qr/key_id: "key\/bad" is not/ ],
	[ 'unknown option',   [ 'regoin=us-east-1' ],            'alias/cmk-tap', qr/regoin: unknown option/ ],
	[ 'http to a remote endpoint', [ 'endpoint=http://kms.example.com' ], 'alias/cmk-tap', qr/endpoint: .*https/ ])
{
	my ($label, $opts, $keyid, $pattern) = @$case;
	my %o = map { split /=/, $_, 2 } (@kms_options, @$opts);
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', "$tmp/bad", '--provider', 'aws', '--key-id', $keyid,
		map { ('--kms-option', "$_=$o{$_}") } sort keys %o);
	is($rc, 1, "$label: initdb fails");
	like($err, qr/\Apg_cmk: error: /, "$label: pg_cmk error line");
	like($err, $pattern, "$label: error names the field");
	is(scalar(() = $err =~ /\n/g), 1, "$label: one line");
}

# --- botocore's own KMS client against the same server -------------------------------
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ $python, "$kmsdir/aws_botocore_client.py", $url, 'us-east-1', $akid, $secret,
			'alias/cmk-tap' ], '<', \undef, '>', \$out, '2>', \$err);
	ok($ok, 'botocore KMS client: DescribeKey, Encrypt, Decrypt and errors parse') or diag("$out\n$err");
	like($out, qr/ok decrypt round trip/, 'botocore decrypted what it encrypted');
	control('set', { key => $kid, state => 'Disabled' });
	($out, $err) = ('', '');
	$ok = IPC::Run::run([ $python, "$kmsdir/aws_botocore_client.py", $url, 'us-east-1', $akid, $secret,
			'alias/cmk-tap', 'disabled' ], '<', \undef, '>', \$out, '2>', \$err);
	ok($ok, 'botocore KMS client parses a Disabled key and DisabledException') or diag("$out\n$err");
	control('set', { key => $kid, state => 'Enabled' });
}

# --- every request was signed correctly ---------------------------------------------
$stats = control('stats');
is($stats->{bad_signatures}, 0, 'no request with a bad signature since the deliberate one')
  or diag($stats->{last_auth_error});
cmp_ok($stats->{verified}, '>', 10, "server verified $stats->{verified} signatures with botocore");

# --- destroyed key, then a stopped server -----------------------------------------------
control('set', { key => $kid, destroy => JSON::PP::true });
status_rc('destroyed key (NotFoundException)', 3, qr/revoked .*NotFoundException/);
$server->kill_kill;
$server->finish;
status_rc('stopped server', 4, qr/unavailable .*(?:refused|failed)/);

done_testing();
