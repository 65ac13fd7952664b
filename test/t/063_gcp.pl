# The Google Cloud KMS key provider end to end, against the loopback Cloud KMS of
# test/kms/gcp_kms_server.py, whose token endpoint checks every service-account JWT
# with PyJWT: pg_cmk initdb through Cloud KMS, start, write, restart, data intact;
# every state of the primary version (and of the version that wrapped the KEK) mapped
# by pg_cmk status to ok (0) / revoked (3) / unavailable (4); the watchdog shutting a
# running server down when the key version is disabled (and not for throttling);
# bad configurations failing with one line naming the field; the metadata server; and
# the installed Google Cloud CLI (independent code) running kms encrypt / decrypt /
# keys describe against the same server and decrypting the KEK ciphertext pg_cmk stored.

use strict;
use warnings;

use Cwd ();
use File::Basename ();
use IPC::Run ();
use JSON::PP ();
use MIME::Base64 ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'needs /usr/bin/python3 with python3-cryptography and python3-jwt (scripts/install_deps.sh)'
  unless python_has_modules('cryptography', 'jwt');

my $dir  = PostgreSQL::Test::Utils::tempdir('gcp');
my $key  = 'projects/cmk-project/locations/global/keyRings/ring/cryptoKeys/cmk-gcp';
my $peer = start_kms_peer('gcp_kms_server.py', '--write-credentials', "$dir/sa.json", '--key', $key,
	'--stall', '5');
my %opts = (endpoint => $peer->{url}, credentials_file => "$dir/sa.json", timeout_ms => 1000);

sub set_state
{
	my ($state, $version) = @_;
	kms_control($peer, action => 'set_state', name => $key, state => $state,
		($version ? (version => $version) : ()));
}

# --- bad configurations: one line naming the field ---------------------------------
{
	open(my $fh, '>', "$dir/user.json") or die;
	print $fh '{"type":"authorized_user","client_id":"x","client_secret":"y","refresh_token":"z"}';
	close $fh;
	chmod 0600, "$dir/user.json";
}
my $n = 0;
for my $case (
	[ 'key_id', 'projects/cmk-project/keyRings/ring/cryptoKeys/cmk-gcp', {%opts} ],
	[ 'key_id', "$key/cryptoKeyVersions/1", {%opts} ],
	[ 'credentials_file', $key, { %opts, credentials_file => "$dir/missing.json" } ],
	[ 'credentials_file', $key, { %opts, credentials_file => "$dir/user.json" } ],
	[ 'ca_file',  $key, { %opts, ca_file  => "$dir/missing.pem" } ],
	[ 'endpoint', $key, { %opts, endpoint => 'http://cloudkms.example.com' } ])
{
	my ($field, $id, $o) = @$case;
	my $d = "$dir/bad" . $n++;
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', $d, '--provider', 'gcp', '--key-id', $id,
		map({ ('--kms-option', "$_=$o->{$_}") } sort keys %$o), '--', '-A', 'trust', '-N');
	is($rc, 1, "bad $field ($n): pg_cmk initdb exits 1");
	like($err, qr/^pg_cmk: error: .*\b\Q$field\E\b/, "bad $field ($n): the error names $field");
	is(scalar(() = $err =~ /\n/g), 1, "bad $field ($n): the error is one line");
	unlike($err, qr/BEGIN PRIVATE KEY|client_secret|refresh_token|"z"/, "bad $field ($n): no secret in the error");
	ok(!-e "$d/PG_VERSION", "bad $field ($n): no cluster was created");
}

# --- initdb through Cloud KMS, start, write, restart --------------------------------
my $node = new_encrypted_node('gcp', provider => 'gcp', key_id => $key, kms_options => \%opts);
my $keyring = $node->data_dir . '/cmk_lakebase/keyring.json';
my $kr_text = PostgreSQL::Test::Utils::slurp_file($keyring);
like($kr_text, qr/"provider":\s*"gcp"/, 'keyring names the gcp provider');
unlike($kr_text, qr/PRIVATE KEY|ya29\./, 'keyring holds no private key and no token');
$node->start;
$node->safe_psql('postgres', q{
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, 'gcp-row-' || g FROM generate_series(1, 500) g;
	CHECKPOINT;});
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), max(v) FROM t'), '500|gcp-row-99',
	'data intact after a restart through Cloud KMS');
my $stats = kms_control($peer, action => 'stats');
cmp_ok($stats->{verified_assertions}, '>=', 3, 'every process got its token by a JWT grant that PyJWT verified');
my $reqs = kms_control($peer, action => 'requests')->{requests};
ok((grep { $_->{path} eq "/v1/$key:decrypt" } @$reqs) >= 2, 'the server start unwrapped the KEK through :decrypt');
ok(!(grep { $_->{path} =~ /^\/v1\// && ($_->{headers}{authorization} // '') !~ /^Bearer ya29\./ } @$reqs),
	'every KMS request carried a bearer token the server issued');

# --- fidelity: the Google Cloud CLI against the same server -------------------------
SKIP:
{
	skip 'gcloud (google-cloud-cli) is not installed', 6 unless system('sh', '-c', 'command -v gcloud >/dev/null') == 0;
	my $token = kms_control($peer, action => 'issue_token')->{access_token};
	my $at = write_secret_file("$dir/access_token", $token);
	mkdir "$dir/gcloud_config";
	local $ENV{CLOUDSDK_CONFIG} = "$dir/gcloud_config";
	local $ENV{CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDKMS} = "$peer->{url}/";
	local $ENV{CLOUDSDK_CORE_DISABLE_PROMPTS} = '1';
	local $ENV{CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK} = '1';
	my @common = ("--access-token-file=$at", '--project', 'cmk-project', '--location', 'global',
		'--keyring', 'ring', '--key', 'cmk-gcp');
	my $gcloud = sub {
		my ($out, $err) = ('', '');
		my $ok = IPC::Run::run([ 'gcloud', @_ ], '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120));
		note "gcloud @_[0..2]: ok=" . ($ok ? 1 : 0) . "\n$out$err";
		return ($ok, $out, $err);
	};
	open(my $fh, '>', "$dir/pt.txt") or die;
	print $fh "gcloud fidelity check";
	close $fh;
	my ($ok) = $gcloud->('kms', 'encrypt', @common, '--plaintext-file', "$dir/pt.txt",
		'--ciphertext-file', "$dir/ct.bin");
	ok($ok && -s "$dir/ct.bin", 'gcloud kms encrypt against the loopback Cloud KMS');
	my ($ok2, $out) = $gcloud->('kms', 'decrypt', @common, '--ciphertext-file', "$dir/ct.bin",
		'--plaintext-file', '-');
	is($out, 'gcloud fidelity check', 'gcloud kms decrypt gives the plaintext back');
	# The KEK ciphertext pg_cmk stored, with our fixed additional authenticated data.
	my $kr = JSON::PP::decode_json($kr_text);
	open($fh, '>:raw', "$dir/kek.bin") or die;
	print $fh MIME::Base64::decode_base64($kr->{wrapped_kek});
	close $fh;
	open($fh, '>', "$dir/aad.txt") or die;
	print $fh 'cmk_lakebase gcp kek v1';
	close $fh;
	my ($ok3) = $gcloud->('kms', 'decrypt', @common, '--ciphertext-file', "$dir/kek.bin",
		'--additional-authenticated-data-file', "$dir/aad.txt", '--plaintext-file', "$dir/kek.out");
	ok($ok3 && -s "$dir/kek.out" == 32, 'gcloud decrypts the KEK ciphertext pg_cmk stored (32 bytes)');
	unlink "$dir/kek.out";
	my ($ok4, $desc) = $gcloud->('kms', 'keys', 'describe', 'cmk-gcp', '--project', 'cmk-project',
		'--location', 'global', '--keyring', 'ring', "--access-token-file=$at",
		'--format=value(primary.state,purpose)');
	like($desc, qr/^ENABLED\s+ENCRYPT_DECRYPT$/, 'gcloud kms keys describe parses the key: ENABLED ENCRYPT_DECRYPT');
	set_state('DISABLED');
	my ($ok5, $desc2) = $gcloud->('kms', 'keys', 'versions', 'describe', '1', '--key', 'cmk-gcp',
		'--project', 'cmk-project', '--location', 'global', '--keyring', 'ring', "--access-token-file=$at",
		'--format=value(state)');
	like($desc2, qr/^DISABLED$/, 'gcloud kms keys versions describe sees DISABLED');
	my ($ok6, $o6, $e6) = $gcloud->('kms', 'decrypt', @common, '--ciphertext-file', "$dir/ct.bin",
		'--plaintext-file', '-');
	ok(!$ok6 && $e6 =~ /FAILED_PRECONDITION|not enabled/, 'gcloud kms decrypt under a disabled version fails as Cloud KMS does');
	set_state('ENABLED');
}

# --- every state -> pg_cmk status ---------------------------------------------------
sub status_is
{
	my ($want, $what) = @_;
	my ($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
	is($rc, $want, "$what: pg_cmk status exits $want");
	return "$out$err";
}
status_is(0, 'primary version ENABLED');
set_state('DISABLED');
like(status_is(3, 'primary version DISABLED'), qr/DISABLED/, 'status names the DISABLED state');
set_state('DESTROY_SCHEDULED');
like(status_is(3, 'primary version DESTROY_SCHEDULED'), qr/DESTROY_SCHEDULED/, 'status names DESTROY_SCHEDULED');
set_state('ENABLED');
status_is(0, 'version restored and enabled');
kms_control($peer, action => 'deny', name => $key);
like(status_is(3, 'PERMISSION_DENIED (403)'), qr/PERMISSION_DENIED/, 'status shows PERMISSION_DENIED');
kms_control($peer, action => 'allow', name => $key);
for my $mode (qw(error500 throttle stall))
{
	kms_control($peer, action => 'mode', value => $mode);
	status_is(4, "server answers $mode");
}
kms_control($peer, action => 'mode', value => 'normal');
kms_control($peer, action => 'revoke_sa');
like(status_is(3, 'service-account key deleted (invalid_grant)'), qr/invalid_grant/, 'status shows invalid_grant');
kms_control($peer, action => 'restore_sa');
kms_control($peer, action => 'rotate', name => $key);
status_is(0, 'key rotated: new primary, the KEK version still enabled');
set_state('DISABLED', 1);
like(status_is(3, 'the version that wrapped the KEK disabled (primary enabled)'), qr/FAILED_PRECONDITION/,
	'the unwrap probe catches the disabled non-primary version');
set_state('ENABLED', 1);
status_is(0, 'version 1 enabled again');

# --- watchdog: a disabled version shuts the running server down; throttling does not -
$node->append_conf('postgresql.conf', "cmk_lakebase.check_interval = 1s");
$node->restart;
kms_control($peer, action => 'mode', value => 'throttle');
sleep 4;
ok(node_is_running($node), 'throttling (outage) does not stop the server');
kms_control($peer, action => 'mode', value => 'normal');
my $log_off = -s $node->logfile;
set_state('DISABLED', 1);
my $took = wait_for_postmaster_exit($node, 20);
ok(defined $took, 'the watchdog shut the server down after the key version was disabled'
	  . (defined $took ? " (${took}s)" : ''));
like(PostgreSQL::Test::Utils::slurp_file($node->logfile, $log_off), qr/is revoked/, 'the log says the key is revoked');
$node->{_pid} = undef;
my ($started, $log) = try_start($node);
ok(!$started, 'the server does not start while the version is disabled');
like($log, qr/FATAL:.*unwrap/, 'the start fails with FATAL about the unwrap');
$node->{_pid} = undef;
set_state('ENABLED', 1);
start_after_crash($node);
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '500', 'version enabled again: the cluster starts, data intact');
$node->stop;

# --- the metadata server instead of a key file ---------------------------------------
{
	my $hostport = "127.0.0.1:$peer->{port}";
	local $ENV{GOOGLE_APPLICATION_CREDENTIALS};
	delete $ENV{GOOGLE_APPLICATION_CREDENTIALS};
	my $node2 = new_encrypted_node('gcp_metadata', provider => 'gcp', key_id => $key,
		kms_options => { endpoint => $peer->{url}, metadata_host => $hostport, timeout_ms => 1000 });
	$node2->start;
	is($node2->safe_psql('postgres', 'SELECT 1'), '1', 'a cluster through the metadata server starts');
	$node2->stop;
	my ($rc) = pg_cmk('status', '-D', $node2->data_dir);
	is($rc, 0, 'metadata server: pg_cmk status ok');
	kms_control($peer, action => 'metadata', value => 'off');
	($rc) = pg_cmk('status', '-D', $node2->data_dir);
	is($rc, 3, 'metadata server without a service account: revoked (exit 3)');
	kms_control($peer, action => 'metadata', value => 'on');
}

# --- destroyed, then the key gone ----------------------------------------------------
set_state('DESTROYED', 1);
like(status_is(3, 'the KEK version DESTROYED'), qr/revoked|FAILED_PRECONDITION/, 'destroyed: revoked');
kms_control($peer, action => 'delete_key', name => $key);
like(status_is(3, 'key deleted (404)'), qr/NOT_FOUND/, 'status shows NOT_FOUND');

done_testing();
