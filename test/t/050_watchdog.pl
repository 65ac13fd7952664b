# The revocation kill switch (issue 4), with the local key provider:
#  - kill latency: with check_interval = 1s, "pg_cmk key disable" while pgbench and a
#    ledger client run; the time from the disable command to the postmaster's exit is
#    measured over several runs, each bounded by check_interval + 3 s, and printed
#    (min/median/max). The server log names key, provider and reason.
#  - restart refused while the key is disabled (and, on a second node, deleted): FATAL
#    with the provider's answer as DETAIL and how to restore access as HINT.
#  - nothing lost: after re-enabling the key the cluster starts, recovers, every
#    commit acknowledged before the kill is there, and amcheck passes.
#  - outage is not revocation: the key store unmounted (renamed away) -> the watchdog
#    reports unavailable and the cluster keeps serving reads and writes; restored ->
#    ok. With on_kms_outage = shutdown and a short grace, the cluster shuts down after
#    the grace, not before.
#  - swapped key: the key file replaced by other key material under the same id ->
#    revoked, cluster down.
#  - the worker: SIGTERM makes it exit and the postmaster restarts it; a reload of
#    check_interval changes its pace; check_key_now() and watchdog_status() report.

use strict;
use warnings;

use File::Copy qw(copy);
use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use CmkTest;

plan skip_all => 'the kill switch needs an encrypted cluster' if is_plain_mode();

my $interval = 1;    # seconds
my $runs     = 3;
my $tmp      = PostgreSQL::Test::Utils::tempdir();

my $node = new_encrypted_node('watchdog', check_interval => "${interval}s", conf => 'log_statement = none',
	start => 1);
my $store  = $node->{cmk_key_store};
my $key_id = $node->{cmk_key_id};
my ($host, $port) = ($node->host, $node->port);
$node->safe_psql(
	'postgres', q{
	CREATE EXTENSION cmk_lakebase;
	CREATE EXTENSION amcheck;
	CREATE TABLE ledger (id bigserial PRIMARY KEY, run int NOT NULL, k int NOT NULL,
	                     payload text NOT NULL);
});
$node->command_ok([ 'pgbench', '-i', '-s', '5', '--quiet', '-h', $host, '-p', $port, 'postgres' ],
	'pgbench -i -s 5');

is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'check_key_now: ok');
my ($state, $provider, $kid, $failures, $action, $wpid) = split /\|/,
  $node->safe_psql('postgres',
	'SELECT state, provider, key_id, consecutive_failures, action, worker_pid FROM cmk_lakebase.watchdog_status()');
is_deeply([ $state, $provider, $kid, $failures, $action ], [ 'ok', 'local', $key_id, 0, 'none' ],
	'watchdog_status: ok, provider, key id, no failures, no action');
ok($wpid > 0, "watchdog worker runs (pid $wpid)");

# Seconds until $pid has exited (polling every 10 ms), or undef after $limit seconds.
sub wait_gone
{
	my ($pid, $t0, $limit) = @_;
	while (time - $t0 < $limit)
	{
		return time - $t0 unless pid_alive($pid);
		sleep 0.01;
	}
	return undef;
}

# Runs a pg_cmk key command, timed from just before it starts.
sub key_command
{
	my ($verb, $id, @more) = @_;
	my ($out, $err) = ('', '');
	my $t0 = time;
	IPC::Run::run([ 'pg_cmk', 'key', $verb, $id, '--key-store', $store, @more ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(60));
	is($?, 0, "pg_cmk key $verb $id") or diag($err);
	return $t0;
}

# A client that inserts one ledger row per transaction and prints "ack <id>" only
# after COMMIT returned: every "ack" is a commit the server acknowledged.
sub start_ledger
{
	my ($run) = @_;
	my $script = "$tmp/ledger$run.sql";
	open(my $fh, '>', $script) or die "$script: $!";
	print $fh "\\set ON_ERROR_STOP 1\n";
	for my $k (1 .. 20000)
	{
		print $fh "INSERT INTO ledger (run, k, payload) VALUES ($run, $k, md5('$run/$k')) RETURNING id \\gset\n"
		  . "\\echo ack :id\n";
	}
	close $fh;
	my $out = "$tmp/ledger$run.out";
	my $h = IPC::Run::start(
		[ 'psql', '-X', '-q', '-A', '-t', '-h', $host, '-p', $port, '-d', 'postgres', '-f', $script ],
		'<', \undef, '>', $out, '2>', "$out.err", IPC::Run::timeout(300));
	return ($h, $out);
}

my @latencies;
my %acked;
for my $run (1 .. $runs)
{
	my ($ledger, $out) = start_ledger($run);
	my ($pgb_out, $pgb_err) = ('', '');
	my $pgbench = IPC::Run::start(
		[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '120', '-h', $host, '-p', $port, 'postgres' ],
		'<', \undef, '>', \$pgb_out, '2>', \$pgb_err, IPC::Run::timeout(300));
	$node->poll_query_until('postgres', "SELECT count(*) >= 200 FROM ledger WHERE run = $run")
	  or die "run $run: the load did not get going";
	sleep 1 + rand(1);

	my $pm      = postmaster_pid($node);
	my $logpos  = -s $node->logfile;
	my $t0      = key_command('disable', $key_id);
	my $latency = wait_gone($pm, $t0, 60);
	ok(defined $latency, "run $run: postmaster exited after the key was disabled");
	$latency //= 999;
	push @latencies, $latency;
	cmp_ok($latency, '<', $interval + 3, sprintf('run %d: kill latency %.2f s < check_interval + 3 s', $run, $latency));
	$node->{_pid} = undef;    # it is gone; Cluster must not try to stop it

	for my $h ($ledger, $pgbench) { eval { $h->finish; 1 } or $h->kill_kill }
	my $log = slurp_file($node->logfile, $logpos);
	like($log, qr/cmk_lakebase: key "\Q$key_id\E" of provider "local" is revoked: .*disabled.*; shutting the cluster down/,
		"run $run: one LOG line names key, provider and reason");
	like($log, qr/received immediate shutdown request/, "run $run: immediate shutdown");
	unlike($log, qr/checkpoint starting: shutdown/, "run $run: no shutdown checkpoint");

	open(my $fh, '<', $out) or die "$out: $!";
	my $n = 0;
	while (<$fh>) { if (/^ack (\d+)$/) { $acked{$1} = 1; $n++ } }
	close $fh;
	ok($n > 0, "run $run: $n ledger commits acknowledged before the kill");

	if ($run == 1)
	{
		# Restart refused while the key is disabled, with a clear FATAL.
		my ($started, $slog) = try_start($node);
		ok(!$started, 'restart refused while the key is disabled');
		like($slog, qr/FATAL:  cmk_lakebase: could not unwrap the key-encryption key with key "\Q$key_id\E" of provider "local"/,
			'FATAL names key and provider');
		like($slog, qr/DETAIL:  .*disabled/, 'DETAIL: what the provider said');
		like($slog, qr/HINT:  .*pg_cmk key enable \Q$key_id\E/, 'HINT: how to restore access');
		$node->{_pid} = undef;
	}

	key_command('enable', $key_id);
	my ($started, $slog) = try_start($node);
	ok($started, "run $run: the cluster starts again once the key is enabled");
	like($slog, qr/database system was interrupted|not properly shut down|redo starts/,
		"run $run: crash recovery ran");
}

my @sorted = sort { $a <=> $b } @latencies;
diag(sprintf('kill latency (local provider, check_interval = %d s, %d runs): min %.2f s, median %.2f s, max %.2f s',
		$interval, $runs, $sorted[0], $sorted[ int(@sorted / 2) ], $sorted[-1]));

# Nothing lost: every acknowledged commit is there, amcheck is clean.
my $ids = join(',', sort { $a <=> $b } keys %acked);
is($node->safe_psql('postgres', "SELECT count(*) FROM ledger WHERE id IN ($ids)"),
	scalar(keys %acked), 'every commit acknowledged before a kill is present (' . scalar(keys %acked) . ')');
is( $node->safe_psql(
		'postgres', q{
	SELECT count(*) FROM (
	  SELECT bt_index_check(c.oid, true) FROM pg_class c JOIN pg_am a ON a.oid = c.relam
	  WHERE a.amname = 'btree' AND c.relpersistence <> 't'
	    AND c.relnamespace = 'public'::regnamespace) s}),
	'4', 'amcheck: btree indexes of ledger and pgbench tables check out with heapallindexed');
is($node->safe_psql('postgres',
	q{SELECT count(*) FROM verify_heapam('ledger') UNION ALL SELECT count(*) FROM verify_heapam('pgbench_accounts')}),
	"0\n0", 'amcheck: heaps of ledger and pgbench_accounts are clean');

# ---- the worker: restart on exit, reload --------------------------------------------
$wpid = $node->safe_psql('postgres', 'SELECT worker_pid FROM cmk_lakebase.watchdog_status()');
kill 'TERM', $wpid;
ok($node->poll_query_until('postgres',
		"SELECT worker_pid IS NOT NULL AND worker_pid <> $wpid AND checks > 0 FROM cmk_lakebase.watchdog_status()"),
	'after SIGTERM the postmaster restarts the watchdog');
ok(!kill(0, $wpid), 'the old worker exited on SIGTERM');

$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.check_interval = '1h'");
$node->reload;
sleep 2.5;    # the worker picks the reload up at its next wake-up (<= 1 s)
my $c0 = $node->safe_psql('postgres', 'SELECT checks FROM cmk_lakebase.watchdog_status()');
sleep 3;
my $c1 = $node->safe_psql('postgres', 'SELECT checks FROM cmk_lakebase.watchdog_status()');
ok($c1 - $c0 <= 1, "check_interval = 1h after reload: at most one check in 3 s ($c0 -> $c1)");
like($node->safe_psql('postgres', 'SELECT next_check - last_check FROM cmk_lakebase.watchdog_status()'),
	qr/^01:00:00/, 'next check one hour after the last');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET cmk_lakebase.check_interval');
$node->reload;
# The worker sleeps up to an hour now; check_key_now() wakes it, and it rereads the
# configuration before checking.
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'check_key_now wakes the worker');
$c0 = $node->safe_psql('postgres', 'SELECT checks FROM cmk_lakebase.watchdog_status()');
sleep 3.5;
$c1 = $node->safe_psql('postgres', 'SELECT checks FROM cmk_lakebase.watchdog_status()');
ok($c1 - $c0 >= 2, "check_interval back to 1 s: several checks in 3.5 s ($c0 -> $c1)");

# ---- outage is not revocation -------------------------------------------------------
my $away = "$store.unmounted";
rename($store, $away) or die "rename $store: $!";
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'unavailable',
	'key store gone: unavailable, not revoked');
sleep 3;
ok(node_is_running($node), 'the cluster keeps serving during the outage');
$node->safe_psql('postgres', "INSERT INTO ledger (run, k, payload) VALUES (99, 1, 'during outage')");
is($node->safe_psql('postgres', "SELECT count(*) FROM ledger WHERE run = 99"), '1', 'writes work during the outage');
$node->safe_psql('postgres', 'CREATE TABLE made_during_outage AS SELECT g FROM generate_series(1, 1000) g');
is($node->safe_psql('postgres', 'SELECT count(*) FROM made_during_outage'), '1000',
	'new relation files (new DEKs) during the outage');
($state, $failures, $action) = split /\|/,
  $node->safe_psql('postgres', 'SELECT state, consecutive_failures, action FROM cmk_lakebase.watchdog_status()');
is($state, 'unavailable', 'watchdog_status: unavailable');
ok($failures >= 2, "consecutive failures counted ($failures)");
is($action, 'continue (on_kms_outage = continue)', 'action: continue');
rename($away, $store) or die "rename $away: $!";
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'key store back: ok');
is($node->safe_psql('postgres', 'SELECT consecutive_failures FROM cmk_lakebase.watchdog_status()'), '0',
	'failures reset');

# on_kms_outage = shutdown with a short grace: down after the grace, not before.
my $grace = 6;
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.on_kms_outage = 'shutdown'");
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.kms_outage_grace = '${grace}s'");
$node->reload;
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'ok before the outage');
my $pm     = postmaster_pid($node);
my $logpos = -s $node->logfile;
my $t_last_ok = time;
rename($store, $away) or die "rename $store: $!";
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'unavailable', 'outage: unavailable');
like($node->safe_psql('postgres', 'SELECT action FROM cmk_lakebase.watchdog_status()'),
	qr/^shutdown at /, 'action: shutdown at the end of the grace');
my $gone = wait_gone($pm, $t_last_ok, $grace + 15);
ok(defined $gone, 'the cluster shut down after the grace');
$gone //= 999;
cmp_ok($gone, '>=', $grace - 0.5, sprintf('not before the grace (%.1f s >= %d s)', $gone, $grace));
cmp_ok($gone, '<', $grace + 8, sprintf('soon after the grace (%.1f s)', $gone));
$node->{_pid} = undef;
my $log = slurp_file($node->logfile, $logpos);
like($log, qr/unavailable for longer than kms_outage_grace \(${grace} s\) for key "\Q$key_id\E"; shutting the cluster down/,
	'log says why');
like($log, qr/received fast shutdown request/, 'a fast (clean) shutdown: the key is still good');
unlike($log, qr/is revoked/, 'an outage is never reported as a revocation');
rename($away, $store) or die "rename $away: $!";
my ($started, $slog) = try_start($node);
ok($started, 'starts again with the key store back');
unlike($slog, qr/not properly shut down/, 'no crash recovery needed after the outage shutdown');
is($node->safe_psql('postgres', "SELECT count(*) FROM ledger WHERE run = 99"), '1', 'the outage-time write is there');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET ALL');
$node->reload;

# ---- swapped key: other key material under the same id -> revoked ------------------
my $other = new_key_store();
create_key($other, $key_id);
copy("$store/$key_id.key", "$tmp/$key_id.key.orig") or die "copy: $!";
$pm     = postmaster_pid($node);
$logpos = -s $node->logfile;
my $t_swap = time;
copy("$other/$key_id.key", "$store/$key_id.key.new") or die "copy: $!";
chmod 0600, "$store/$key_id.key.new";
rename("$store/$key_id.key.new", "$store/$key_id.key") or die "rename: $!";
$gone = wait_gone($pm, $t_swap, 30);
ok(defined $gone, sprintf('swapped key material: cluster down in %.2f s', $gone // 0));
$node->{_pid} = undef;
$log = slurp_file($node->logfile, $logpos);
like($log, qr/key "\Q$key_id\E" of provider "local" is revoked: .*wrong key material/, 'swapped key is a revocation');
($started, $slog) = try_start($node);
ok(!$started, 'and the cluster does not start under the swapped key');
$node->{_pid} = undef;
copy("$tmp/$key_id.key.orig", "$store/$key_id.key") or die "copy: $!";
chmod 0600, "$store/$key_id.key";
($started) = try_start($node);
ok($started, 'the original key file restored: starts');
is($node->safe_psql('postgres', 'SELECT count(*) FROM ledger WHERE id IN (' . $ids . ')'), scalar(keys %acked),
	'data intact');
$node->stop;

# ---- deleted key: irreversible, restart refused --------------------------------------
my $dnode = new_encrypted_node('deleted', check_interval => '1s', start => 1);
$dnode->safe_psql('postgres', 'CREATE TABLE t AS SELECT 1 AS x');
$pm = postmaster_pid($dnode);
my ($out, $err) = ('', '');
my $t_del = time;
IPC::Run::run([ 'pg_cmk', 'key', 'delete', $dnode->{cmk_key_id}, '--yes', '--key-store', $dnode->{cmk_key_store} ],
	'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(60));
is($?, 0, 'pg_cmk key delete');
$gone = wait_gone($pm, $t_del, 30);
ok(defined $gone && $gone < $interval + 3, sprintf('deleted key: cluster down in %.2f s', $gone // 0));
$dnode->{_pid} = undef;
($started, $slog) = try_start($dnode);
ok(!$started, 'restart refused with the key deleted');
like($slog, qr/FATAL:  cmk_lakebase: could not unwrap the key-encryption key with key "\Q$dnode->{cmk_key_id}\E"/,
	'FATAL names the key');
like($slog, qr/DETAIL:  .*deleted/, 'DETAIL says the key was deleted');
$dnode->{_pid} = undef;

done_testing();
