# Azure key configuration through workload identity federation in the customer's tenant
# (issue 19), against the loopback Entra ID + Key Vault of test/kms/azure_kv_server.py:
# the projected service-account token (federated_token_file) is the client assertion of
# a multi-tenant app, asked in the customer's tenant (tenant_id), checked by the server
# against the app's federated identity credential. pg_cmk initdb, start, write, restart;
# the audit trail names the app and tenant; the federated credential removed: the
# watchdog's token refresh meets AADSTS70021 and the cluster is down within
# check_interval + 3 s, restart refused, restored: starts with nothing lost; the app's
# consent revoked in the tenant and its tokens refused: down within check_interval + 3 s;
# an Entra ID outage is an outage; a relative token path fails with one line; the Azure
# SDK's ClientAssertionCredential takes the same route (test/kms/azure_sdk_workload.py).

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
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'Azure provider test needs encrypted nodes' if is_plain_mode();
my $kms_dir = abs_path(dirname(__FILE__) . '/../kms');
my $python  = '/usr/bin/python3';
plan skip_all => "$python is missing" unless -x $python;

my $state  = PostgreSQL::Test::Utils::tempdir('azure_wif');
my $server = IPC::Run::start([ $python, "$kms_dir/azure_kv_server.py", '--state-dir', $state, '--lifetime', '900' ],
	'<', \undef, '>', "$state/server.out", '2>', "$state/server.err");
END { my $rc = $?; $server->kill_kill if $server; $? = $rc; }
for (1 .. 300) { last if -f "$state/server.json"; select(undef, undef, undef, 0.2) }
BAIL_OUT('azure test server did not start: ' . slurp_file("$state/server.err")) unless -f "$state/server.json";
my $info     = JSON::PP::decode_json(slurp_file("$state/server.json"));
my $kid      = "https://127.0.0.1:$info->{port}/keys/k/v1";
my $http     = HTTP::Tiny->new(timeout => 30);
my $interval = 1;

sub control
{
	my (%c) = @_;
	my $r = $http->post($info->{control_url},
		{ content => JSON::PP::encode_json(\%c), headers => { 'Content-Type' => 'application/json' } });
	BAIL_OUT("control $c{action} failed: $r->{status} $r->{content}") unless $r->{success};
}

# --- the Azure SDK's assertion credential against the same Entra ID -----------------------
SKIP:
{
	skip 'python3-azure not installed', 1 unless python_has_modules('azure.identity');
	my ($out, $err) = ('', '');
	IPC::Run::run([ $python, "$kms_dir/azure_sdk_workload.py", $state ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(120));
	is($? >> 8, 0, "the Azure SDK's ClientAssertionCredential takes the federated route") or diag("$out\n$err");
}

my @opts = (
	"ca_file=$state/ca.pem", "tenant_id=$info->{customer_tenant}", "client_id=$info->{client_id}",
	"federated_token_file=$state/federated_token", "authority_host=$info->{authority_host}", 'timeout=3');

{
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', "$state/bad", '--provider', 'azure', '--key-id', $kid,
		(map { ('--kms-option', $_) } (grep { !/^federated_token_file=/ } @opts), 'federated_token_file=token'));
	is($rc, 1, 'relative federated_token_file: initdb exits 1');
	like($err, qr/\Apg_cmk: error: federated_token_file: /, 'the error names the field');
	is(scalar(() = $err =~ /\n/g), 1, 'one line');
}

# Tokens live 2 s: the token cache refreshes them at half their life, so every watchdog
# probe asks Entra ID again and meets a removed federated credential at once.
control(action => 'token_lifetime', seconds => 2);
my $node = new_encrypted_node('azure_wif', provider => 'azure', key_id => $kid, kms_options => \@opts,
	check_interval => "${interval}s");
my $datadir = $node->data_dir;
unlike(slurp_file("$datadir/cmk_lakebase/keyring.json"), qr/eyJ/, 'no token in the keyring');
$node->start;
$node->safe_psql('postgres',
	"CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'wif-' || g FROM generate_series(1, 1000) g;");
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1000|500500',
	'data intact after a restart through workload identity federation');
my $audit = slurp_file("$datadir/cmk_lakebase/audit.log");
like($audit,
	qr/"action":"unwrap"[^\n]*"outcome":"ok"[^\n]*"as":"app \Q$info->{client_id}\E in tenant \Q$info->{customer_tenant}\E \(workload identity federation\)"/,
	'the audit trail names the app and the customer tenant');
unlike($audit, qr/eyJ/, 'no token in the audit trail');

# --- the federated identity credential removed ----------------------------------------------
sleep 1.5;
$node->safe_psql('postgres', "INSERT INTO t VALUES (1001, 'before revocation')");
my $log_off = -s $node->logfile;
control(action => 'remove_federated');
my $took = wait_for_postmaster_exit($node, 30);
cmp_ok($took // 99, '<', $interval + 3,
	sprintf('federated credential removed: down in %.2f s < check_interval + 3 s', $took // 99));
$node->_update_pid(0);
like(slurp_file($node->logfile, $log_off), qr/AADSTS70021/, 'server log: AADSTS70021');
my ($started) = try_start($node);
ok(!$started, 'restart refused while the federated credential is missing');
$node->_update_pid(0);
control(action => 'add_federated');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1001|501501',
	'federated credential restored: starts with nothing lost');

# --- consent revoked in the customer's tenant, tokens refused (long-lived tokens) ----------
control(action => 'token_lifetime', seconds => 3600);
$node->restart;
sleep 1;
$node->safe_psql('postgres', "INSERT INTO t VALUES (1002, 'before consent revoked')");
control(action => 'revoke_consent');
control(action => 'reject_tokens');
$took = wait_for_postmaster_exit($node, 30);
cmp_ok($took // 99, '<', $interval + 3,
	sprintf('consent revoked: down in %.2f s < check_interval + 3 s', $took // 99));
$node->_update_pid(0);
($started) = try_start($node);
ok(!$started, 'restart refused');
$node->_update_pid(0);
control(action => 'grant_consent');
control(action => 'accept_tokens');
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'), '1002|502503', 'restored again: nothing lost');
$node->stop;

# --- an outage is an outage ----------------------------------------------------------------
control(action => 'fail500');
{
	my ($rc) = pg_cmk('status', '-D', $datadir);
	is($rc, 4, 'Entra ID and Key Vault answering 500: pg_cmk status says unavailable (exit 4)');
}
control(action => 'normal');

done_testing();
