# The Azure Key Vault provider end to end, against the loopback Key Vault + Entra ID +
# managed identity server test/kms/azure_kv_server.py (HTTPS with a throwaway CA):
#  - the Azure SDK (python3-azure) accepts that server's answers (test/kms/azure_sdk_check.py);
#  - bad configurations fail at initdb with one line naming the field, and TLS is verified;
#  - pg_cmk initdb --provider azure (client secret), start, write, restart, data intact;
#    our requests use api-version 7.4 and the user agent cmk_lakebase;
#  - every key state maps onto pg_cmk status revoked (exit 3) or unavailable (exit 4),
#    and back to ok (exit 0) once restored; a revoked key refuses a start;
#  - certificate (client assertion) and managed identity credentials;
#  - the watchdog (check_interval = 1s) keeps serving through a 500 outage and shuts the
#    server down when the key is disabled; the cluster starts again once it is enabled.
#
# The key id URL points straight at the loopback server (https://127.0.0.1:PORT/keys/
# k/v1): the provider accepts loopback hosts, with the Key Vault resource
# (https://vault.azure.net) as the token audience, so no DNS mapping is needed.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use CmkTest;

my $kms_dir = abs_path(dirname(__FILE__) . '/../kms');
my $python  = '/usr/bin/python3';
plan skip_all => "$python is missing" unless -x $python;

my $state = PostgreSQL::Test::Utils::tempdir('azure');
# Output to files, not pipes: nothing here pumps them, and a full pipe would block it.
my $server = IPC::Run::start(
	[ $python, "$kms_dir/azure_kv_server.py", '--state-dir', $state, '--lifetime', '900' ],
	'<', \undef, '>', "$state/server.out", '2>', "$state/server.err");
my $deadline = time + 60;
sleep 0.2 while !-f "$state/server.json" && time < $deadline;
BAIL_OUT("azure test server did not start: " . slurp_file("$state/server.err"))
  unless -f "$state/server.json";
my $info = JSON::PP::decode_json(slurp_file("$state/server.json"));
my $port = $info->{port};
my $ca   = "$state/ca.pem";
my $kid  = "https://127.0.0.1:$port/keys/k/v1";
my $http = HTTP::Tiny->new(timeout => 30);
note "azure test server on port $port (http $info->{http_port})";

sub control
{
	my (%c) = @_;
	my $r = $http->post($info->{control_url},
		{ content => JSON::PP::encode_json(\%c), headers => { 'Content-Type' => 'application/json' } });
	BAIL_OUT("control $c{action} failed: $r->{status} $r->{content}") unless $r->{success};
}

sub restore_all
{
	control(action => $_) for qw(restore allow accept_tokens accept_credentials normal);
	control(action => 'no_identity', on => JSON::PP::false);
}

sub server_log
{
	my $r = $http->get("http://127.0.0.1:$info->{http_port}/_log");
	return JSON::PP::decode_json($r->{content});
}

# --- 1. the Azure SDK accepts the test server's answers
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ $python, "$kms_dir/azure_sdk_check.py", $state ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(180));
	my $rc = $? >> 8;
	note $out;
	is($rc, 0, 'the Azure SDK accepts the test server (azure_sdk_check.py)') or diag("$out\n$err");
	like($out, qr/^azure_sdk_check: 0 failure\(s\)$/m, 'SDK check reports no failures');
}
restore_all();

my @secret_opts = (
	"ca_file=$ca",              "tenant_id=$info->{tenant}",
	"client_id=$info->{client_id}", "client_secret_file=$state/client_secret",
	"authority_host=$info->{authority_host}", "timeout=3");

sub kms_args { return map { ('--kms-option', $_) } @_ }

# --- 2. bad configurations: one line naming the field, before any cluster exists
{
	my $n = 0;
	my @cases = (
		[ 'versionless key id', "https://127.0.0.1:$port/keys/k", [@secret_opts], qr/key_id: .*version/ ],
		[ 'http key id', "http://127.0.0.1:$port/keys/k/v1", [@secret_opts], qr/key_id: .*https/ ],
		[ 'foreign host', "https://example.com/keys/k/v1", [@secret_opts], qr/key_id: .*example\.com/ ],
		[ 'missing CA file', $kid, [ @secret_opts, "ca_file=$state/none.pem" ], qr/ca_file: / ],
		[ 'bad algorithm', $kid, [ @secret_opts, 'algorithm=RSA1_5' ], qr/algorithm: / ],
		[ 'unknown option', $kid, [ @secret_opts, 'colour=blue' ], qr/colour: / ],
		[ 'client id not a GUID', $kid, [ @secret_opts, 'client_id=app' ], qr/client_id: / ],
		[ 'missing secret file', $kid, [ @secret_opts, "client_secret_file=$state/none" ], qr/client_secret_file: / ],
		[ 'relative secret file', $kid, [ @secret_opts, "client_secret_file=client_secret" ], qr/client_secret_file: .*absolute/ ],
		[ 'secret file readable by others', $kid, [ @secret_opts, "client_secret_file=$state/ca.pem" ],
			qr/client_secret_file: .*chmod 600/ ],
		[ 'no certificate key', $kid,
			[ grep({ !/client_secret_file/ } @secret_opts), "client_certificate_file=$state/identity_header" ],
			qr/client_certificate_file: / ],
	);
	for my $c (@cases)
	{
		my ($label, $id, $opts, $re) = @$c;
		my $dir = PostgreSQL::Test::Utils::tempdir('badcfg') . '/data' . ++$n;
		my ($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'azure', '--key-id', $id,
			kms_args(@$opts), '--', '-A', 'trust', '-N');
		isnt($rc, 0, "bad config ($label): initdb fails");
		like($err, $re, "bad config ($label): the error names the field");
		is(scalar(() = $err =~ /\n/g), 1, "bad config ($label): one line") or diag($err);
		ok(!-e "$dir/PG_VERSION", "bad config ($label): no cluster left");
	}
	# TLS is verified: without the test CA the vault is not trusted.
	my $dir = PostgreSQL::Test::Utils::tempdir('badcfg') . '/notrust';
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'azure', '--key-id', $kid,
		kms_args(grep { !/^ca_file=/ } @secret_opts), '--', '-A', 'trust', '-N');
	isnt($rc, 0, 'without ca_file the test server is not trusted');
	like($err, qr/certificate/i, 'the error is the TLS verification failure');
	like($err, qr/\Q$kid\E.*ca_file/, 'it names the key and suggests ca_file');
}

# --- 3. a cluster under the azure provider (client secret)
my $node = new_encrypted_node('azure_secret', provider => 'azure', key_id => $kid, kms_options => \@secret_opts,
	check_interval => '1s');
my $keyring = slurp_file($node->data_dir . '/cmk_lakebase/keyring.json');
like($keyring, qr/"provider"\s*:\s*"azure"/, 'keyring names the azure provider');
my $secret = slurp_file("$state/client_secret");
$secret =~ s/\s+$//;
ok(index($keyring, $secret) < 0, 'keyring holds no client secret');

$node->start;
my $marker = 'AZUREMARKER' . int(rand(1e9));
$node->safe_psql('postgres', qq{
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, '$marker-' || g FROM generate_series(1, 500) g;
	CHECKPOINT;
});
my $expect = $node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t');
is($expect, '500|125250', 'rows written under the azure provider');
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), $expect, 'data intact after restart');
my @hits = scan_for_markers($node->data_dir, $marker);
is(scalar(@hits), 0, 'no plaintext marker under the data directory') or diag(join("\n", @hits));

{
	my @ours = grep { ($_->{ua} // '') =~ /^cmk_lakebase\// } @{ server_log() };
	my @vault = grep { $_->{kind} eq 'vault' } @ours;
	ok(scalar(grep { $_->{op} eq 'wrapkey' } @vault) >= 1,   'our provider called wrapkey');
	ok(scalar(grep { $_->{op} eq 'unwrapkey' } @vault) >= 2, 'our provider called unwrapkey (initdb, starts)');
	is(scalar(grep { ($_->{api_version} // '') ne '7.4' } @vault), 0, 'every vault call used api-version 7.4');
	is(scalar(grep { !$_->{has_token} } @vault), 0, 'every vault call carried a bearer token');
	my @tok = grep { $_->{kind} eq 'token' } @ours;
	ok(@tok >= 1 && !grep({ $_->{auth} ne 'secret' || $_->{scope} ne 'https://vault.azure.net/.default' } @tok),
		'tokens from Entra ID: client secret, Key Vault scope');
}

my ($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
is($rc, 0, 'pg_cmk status: ok with the server running');
like($out, qr/^provider: azure$/m, 'status names the provider');
like($out, qr/^key_state: ok \(enabled/m, 'status: key enabled');

# --- 4. each state at the vault -> pg_cmk status (server stopped: the watchdog comes later)
$node->stop;
# With no server running (its watchdog would interleave), one pg_cmk status makes
# exactly one token request, then the key GET and the unwrap probe.
my $log_before = scalar @{ server_log() };
($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
is($rc, 0, 'pg_cmk status: ok with the server stopped');
{
	my $all = server_log();
	my @new = grep { ($_->{ua} // '') =~ /^cmk_lakebase\// } @$all[ $log_before .. $#$all ];
	is(scalar(grep { $_->{kind} eq 'token' } @new), 1, 'pg_cmk status: one token for its key GET and unwrap (cache)');
	is(join(',', map { $_->{op} } grep { $_->{kind} eq 'vault' } @new), 'get,unwrapkey',
		'pg_cmk status: key GET, then the unwrap probe');
}
my @states = (
	[ 'disabled',              3, [ action => 'disable' ], qr/disabled/ ],
	[ 'expired',               3, [ action => 'expire' ], qr/expired/ ],
	[ 'not yet valid',         3, [ action => 'notyet' ], qr/not valid before|not yet valid/ ],
	[ 'deleted',               3, [ action => 'delete' ], qr/KeyNotFound/ ],
	[ 'access denied',         3, [ action => 'deny' ], qr/ForbiddenByPolicy/ ],
	[ 'unwrapKey not permitted', 3, [ action => 'drop_unwrap_op' ], qr/unwrapKey/ ],
	[ '401 after a fresh token', 3, [ action => 'reject_tokens' ], qr/fresh access token/ ],
	[ 'credentials refused',   3, [ action => 'refuse_credentials' ], qr/AADSTS7000222/ ],
	[ '500',                   4, [ action => 'fail500' ], qr/HTTP 500/ ],
	[ 'throttled',             4, [ action => 'throttle' ], qr/HTTP 429/ ],
	[ 'stalled',               4, [ action => 'stall', seconds => 20 ], qr/timed out|Timeout/i ],
);
for my $s (@states)
{
	my ($label, $want, $ctl, $re) = @$s;
	control(@$ctl);
	my $t0 = time;
	($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
	is($rc, $want, "$label: pg_cmk status exits $want (" . ($want == 3 ? 'revoked' : 'unavailable') . ')');
	like($out, $want == 3 ? qr/^key_state: revoked/m : qr/^key_state: unavailable/m, "$label: key_state");
	like($out . $err, $re, "$label: the provider's answer is shown");
	like($out, qr/\Q$kid\E/, "$label: the key id is named");
	note sprintf('%s took %.1f s', $label, time - $t0);
	restore_all();
	($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
	is($rc, 0, "$label: restored, status ok again");
}

# A revoked key refuses a start; restored, the cluster starts with its data.
control(action => 'disable');
my ($started, $log) = try_start($node);
ok(!$started, 'disabled key: the server refuses to start');
like($log, qr/FATAL:.*unwrap/, 'disabled key: FATAL names the unwrap');
like($log, qr/\Q$kid\E/, 'disabled key: the log names the key id');
restore_all();
($started, $log) = try_start($node);
ok($started, 'key enabled again: the server starts') or diag($log);
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), $expect, 'data intact after the refusal');

# --- 5. the watchdog: an outage keeps serving, a disable shuts the server down
control(action => 'fail500');
sleep 4;
ok(node_is_running($node), 'vault answering 500: the server keeps serving (outage, not revocation)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '500', 'queries work during the outage');
control(action => 'normal');
sleep 2;
control(action => 'disable');
my $t_disable = time;
my $gone = 0;
while (time - $t_disable < 30)
{
	if (!node_is_running($node)) { $gone = 1; last; }
	sleep 0.25;
}
ok($gone, 'key disabled: the watchdog shut the server down');
note sprintf('server gone %.1f s after the disable', time - $t_disable);
ok(time - $t_disable < 15, 'within 15 s of the disable (check_interval 1s)');
$node->{_pid} = undef;
like(slurp_file($node->logfile), qr/revoked/, 'the server log says the key is revoked');
restore_all();
($started, $log) = try_start($node);
ok($started, 'key enabled: the server starts again after the kill switch') or diag($log);
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), $expect, 'committed data intact after the kill switch');
$node->stop;

# --- 6. certificate credentials (RS256 client assertion) and managed identity
my @cert_opts = (
	"ca_file=$ca", "tenant_id=$info->{tenant}", "client_id=$info->{client_id}",
	"client_certificate_file=$state/client.pem", "authority_host=$info->{authority_host}");
my $n_assert = () = grep { ($_->{auth} // '') eq 'assertion' && ($_->{ua} // '') =~ /^cmk_lakebase/ } @{ server_log() };
my $cnode = new_encrypted_node('azure_cert', provider => 'azure', key_id => $kid, kms_options => \@cert_opts, fsync => 0);
($rc, $out, $err) = pg_cmk('status', '-D', $cnode->data_dir);
is($rc, 0, 'certificate credential: pg_cmk status ok');
{
	my @a = grep { ($_->{auth} // '') eq 'assertion' && ($_->{ua} // '') =~ /^cmk_lakebase/ } @{ server_log() };
	ok(@a > $n_assert, 'certificate credential: tokens were requested with a client assertion');
	is(scalar(grep { $_->{assertion_error} } @a), 0, 'the server verified every assertion of ours')
	  or diag(join("\n", map { $_->{assertion_error} // '' } @a));
}
control(action => 'refuse_credentials');
($rc, $out, $err) = pg_cmk('status', '-D', $cnode->data_dir);
is($rc, 3, 'certificate credential refused by Entra ID: revoked');
restore_all();

my $mnode = new_encrypted_node('azure_mi', provider => 'azure', key_id => $kid,
	kms_options => [ "ca_file=$ca", "identity_endpoint=$info->{imds_endpoint}" ], fsync => 0);
($rc, $out, $err) = pg_cmk('status', '-D', $mnode->data_dir);
is($rc, 0, 'managed identity (IMDS protocol): pg_cmk status ok');
ok(scalar(grep { $_->{kind} eq 'mi' && $_->{protocol} eq 'imds' && $_->{has_header} } @{ server_log() }),
	'managed identity tokens asked with Metadata: true');
$mnode->start;
is($mnode->safe_psql('postgres', 'SELECT 1'), '1', 'managed identity cluster starts');
$mnode->stop;
control(action => 'no_identity');
($rc, $out, $err) = pg_cmk('status', '-D', $mnode->data_dir);
is($rc, 3, 'no managed identity on the machine any more: revoked');
like($out, qr/Identity not found/, 'the identity endpoint answer is shown');
restore_all();

# --- 7. the vault unreachable: unavailable, not revoked
$server->kill_kill;
$server->finish;
($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
is($rc, 4, 'test server stopped: pg_cmk status unavailable (exit 4)');
like($out, qr/^key_state: unavailable/m, 'key_state unavailable when the vault is unreachable');

done_testing();
