# A hung key provider (issue 18, item 4): the loopback Vault holds every request
# without an answer ("stall" mode: a KMS behind a hung network path or a wedged proxy;
# the provider's own timeout_ms is far away). The watchdog's probe runs on a thread of
# its own with a deadline (cmk_lakebase.probe_timeout):
#  - past the deadline the key is "unavailable" (never "ok"), watchdog_status() shows
#    the probe in flight and since when, check_key_now() answers instead of hanging,
#    and the cluster keeps serving (on_kms_outage = continue);
#  - the provider answering again is picked up, the key is ok again;
#  - a revocation is enforced while a probe hangs: the probe past its deadline is
#    abandoned and the next one, on a thread of its own, sees the key denied;
#  - with on_kms_outage = shutdown the cluster goes down (fast, clean) within
#    grace + probe_timeout + a few seconds, although the probe still hangs, and the
#    shutdown logs no FATAL for the watchdog; with the provider back it starts.
# And a local key file replaced by a FIFO (which used to block the open forever) is
# refused at once by pg_cmk status and at server start, naming the file.

use strict;
use warnings;

use POSIX qw(mkfifo);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use CmkTest;
use CmkKmsPeer;

plan skip_all => 'the watchdog needs an encrypted cluster' if is_plain_mode();
plan skip_all => 'needs /usr/bin/python3 with python3-cryptography (scripts/install_deps.sh)'
  unless python_has_modules('cryptography');

my $timeout = 2;    # probe_timeout, seconds
my $dir   = PostgreSQL::Test::Utils::tempdir('vault_hang');
my $token = write_secret_file("$dir/token", 'hvs.root-' . int(rand(1e12)));
my $key_id = 'cmk-hang';
my $peer  = start_kms_peer('vault_server.py', '--token-file', $token, '--key', $key_id, '--stall', '5');
my $node = new_encrypted_node('hang', provider => 'vault', key_id => $key_id,
	kms_options => { addr => "http://127.0.0.1:$peer->{port}", token_file => $token, timeout_ms => 600000 },
	check_interval => '1s',
	conf => [ "cmk_lakebase.probe_timeout = '${timeout}s'", 'log_statement = none' ], start => 1);
$node->safe_psql('postgres', q{
	CREATE EXTENSION cmk_lakebase;
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;
});

is($node->safe_psql('postgres', 'SHOW cmk_lakebase.probe_timeout'), "${timeout}s", 'probe_timeout is a setting');
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'ok before the hang');

# The provider stops answering: every request is held (5 s, then a 503, and the
# provider's retry is held again) until the mode is back to normal.
sub hang_key_store
{
	kms_control($peer, action => 'mode', value => 'stall');
}

sub release_key_store
{
	return kms_control($peer, action => 'mode', value => 'normal')->{mode} eq 'normal';
}

# ---- a hang with on_kms_outage = continue ----------------------------------------------
my $logpos = -s $node->logfile;
my $t0 = time;
hang_key_store();
my $answer = $node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()');
my $took = time - $t0;
is($answer, 'unavailable', 'a probe past probe_timeout is unavailable, not ok');
cmp_ok($took, '<', $timeout + 5, sprintf('check_key_now answered in %.1f s (probe_timeout %d s)', $took, $timeout));
my ($state, $in_flight, $stuck_for, $result, $action) = split /\|/, $node->safe_psql('postgres',
	q{SELECT state, probe_in_flight, extract(epoch FROM now() - probe_started)::int, last_result, action
	  FROM cmk_lakebase.watchdog_status()});
is($state, 'unavailable', 'watchdog_status: unavailable');
is($in_flight, 't', 'watchdog_status: a probe is in flight');
cmp_ok($stuck_for, '>=', $timeout - 1, "watchdog_status: probe_started says since when ($stuck_for s ago)");
like($result, qr/no answer from the key provider within probe_timeout \(${timeout} s\)/, 'last_result says why');
is($action, 'continue (on_kms_outage = continue)', 'action: continue');
sleep 2;
my ($checks1, $stuck1) = split /\|/, $node->safe_psql('postgres',
	q{SELECT checks, extract(epoch FROM now() - probe_started)::int FROM cmk_lakebase.watchdog_status()});
is($node->safe_psql('postgres', 'SELECT state FROM cmk_lakebase.watchdog_status()'), 'unavailable',
	'still unavailable while the probe hangs (no second probe reports ok)');
cmp_ok($stuck1, '>', $stuck_for, 'the same probe is still in flight');
$node->safe_psql('postgres', "INSERT INTO t VALUES (1000, 'during the hang')");
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '101', 'the cluster keeps serving during the hang');
my $log = slurp_file($node->logfile, $logpos);
like($log, qr/the probe of key "\Q$key_id\E" of provider "vault" has not answered within probe_timeout \(${timeout} s\)/,
	'one LOG line names key, provider and the deadline');

ok(release_key_store(), 'the provider answers again');
ok($node->poll_query_until('postgres',
		q{SELECT state = 'ok' AND NOT probe_in_flight AND probe_started IS NULL FROM cmk_lakebase.watchdog_status()}),
	'provider back: the hung probe ends, the next one is ok');
is($node->safe_psql('postgres', 'SELECT consecutive_failures FROM cmk_lakebase.watchdog_status()'), '0',
	'failures reset');

# ---- a revocation while a probe hangs -----------------------------------------------
# The provider holds the requests of a stall for two minutes (a wedged connection). The
# probe past its deadline is abandoned, and the next one starts on a thread of its own.
# The key is then denied and the provider answers again: the next probe sees the
# revocation and the kill switch acts, although the first probe is still held. (With
# one probe at a time, the kill switch waited for the held request: two minutes.)
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'ok before the held probe');
my $rpm = postmaster_pid($node);
$logpos = -s $node->logfile;
kms_control($peer, action => 'mode', value => 'stall', seconds => 120);
ok($node->poll_query_until('postgres',
		q{SELECT state = 'unavailable' AND probe_in_flight FROM cmk_lakebase.watchdog_status()}),
	'a probe held past probe_timeout: unavailable');
kms_control($peer, action => 'deny', name => $key_id);
release_key_store();
$t0 = time;
my $killed;
while (time - $t0 < 60)
{
	if (!pid_alive($rpm)) { $killed = time - $t0; last }
	sleep 0.05;
}
ok(defined $killed, 'the key denied while a probe is held: the cluster is shut down');
$killed //= 999;
cmp_ok($killed, '<', $timeout + 1 + 3,
	sprintf('within probe_timeout + check_interval + 3 s (%.1f s), not when the held request ends (120 s)', $killed));
$node->{_pid} = undef;
$log = slurp_file($node->logfile, $logpos);
like($log, qr/key "\Q$key_id\E" of provider "vault" is revoked/, 'the log says the key is revoked');
my ($rstarted) = try_start($node);
ok(!$rstarted, 'the key still denied: the cluster does not start');
kms_control($peer, action => 'allow', name => $key_id);
($rstarted) = try_start($node);
ok($rstarted, 'the key allowed again: the cluster starts');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '101', 'nothing lost');

# ---- a hang with on_kms_outage = shutdown --------------------------------------------
my $grace = 4;
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.on_kms_outage = 'shutdown'");
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.kms_outage_grace = '${grace}s'");
$node->reload;
sleep 1.5;
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'ok before the second hang');
my $pm = postmaster_pid($node);
$logpos = -s $node->logfile;
$t0 = time;
hang_key_store();
my $gone;
while (time - $t0 < $grace + $timeout + 30)
{
	if (!pid_alive($pm)) { $gone = time - $t0; last }
	sleep 0.05;
}
ok(defined $gone, 'the cluster shut down although the probe hangs');
$gone //= 999;
cmp_ok($gone, '<', $grace + $timeout + 4,
	sprintf('within grace + probe_timeout + a few seconds (%.1f s; grace %d s, probe_timeout %d s)', $gone, $grace, $timeout));
cmp_ok($gone, '>=', $grace - 1.5, sprintf('not before the grace (%.1f s)', $gone));
$node->{_pid} = undef;
$log = slurp_file($node->logfile, $logpos);
like($log, qr/unavailable for longer than kms_outage_grace \(${grace} s\) for key "\Q$key_id\E"; shutting the cluster down/,
	'the log says why');
like($log, qr/received fast shutdown request/, 'a fast (clean) shutdown');
unlike($log, qr/is revoked/, 'a hang is never reported as a revocation');
unlike($log, qr/FATAL:.*watchdog/, 'no FATAL line for the watchdog in the shutdown');

release_key_store();
my ($started, $slog) = try_start($node);
ok($started, 'the provider back: the cluster starts');
unlike($slog, qr/not properly shut down/, 'no crash recovery after the outage shutdown');
is($node->safe_psql('postgres', "SELECT v FROM t WHERE id = 1000"), 'during the hang', 'the write made during the hang is there');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET ALL');
$node->stop;
my $stoplog = slurp_file($node->logfile);
unlike($stoplog, qr/terminating background worker "cmk_lakebase watchdog"/,
	'no clean shutdown in this test logged "terminating background worker"');


# ---- a FIFO in a local key file's place is refused at once, not waited on ------------
my $local = new_encrypted_node('fifo');
my $lkey = "$local->{cmk_key_store}/$local->{cmk_key_id}.key";
rename($lkey, "$lkey.aside") or die "rename $lkey: $!";
mkfifo($lkey, 0600) or die "mkfifo $lkey: $!";
$t0 = time;
my ($rc, $out, $err) = pg_cmk('status', '-D', $local->data_dir);
$took = time - $t0;
isnt($rc, 0, 'pg_cmk status with a FIFO as the key file: fails');
like($err . $out, qr/\Q$lkey\E" is not a regular file/, '... naming the file and why');
cmp_ok($took, '<', 20, sprintf('... at once (%.1f s), instead of blocking in open()', $took));
my ($fstarted, $flog) = try_start($local);
ok(!$fstarted, 'the server does not start with a FIFO as the key file');
like($flog, qr/is not a regular file/, '... and says why');
unlink $lkey;
rename("$lkey.aside", $lkey) or die "rename $lkey.aside: $!";
($fstarted) = try_start($local);
ok($fstarted, 'the key file back: it starts');
$local->stop;

done_testing();
