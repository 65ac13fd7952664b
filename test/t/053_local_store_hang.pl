# A hung LOCAL key store (issue 18, item 4): the local provider's key store on a file
# system whose every operation blocks, as on a hard NFS mount whose server went away.
# test/kms/hang_fs.py is that file system (FUSE, mounted as root by test/run_all.sh,
# path in CMK_TEST_HANG_FS): while the control file CMK_TEST_HANG_CONTROL exists, a
# stat, open or read of the key file blocks in the kernel. (TAP 051 covers a KMS that
# never answers and a FIFO in the key file's place; this is the key file itself
# hanging.) The watchdog's probe has a deadline (cmk_lakebase.probe_timeout) for the
# local provider's file calls too:
#  - hung: within probe_timeout + check_interval + a margin the key is "unavailable"
#    (never "ok" with a frozen last_check), watchdog_status() shows the probe in flight
#    and since when;
#  - with on_kms_outage = shutdown the cluster goes down (fast, clean) within
#    probe_timeout + kms_outage_grace + check_interval + 3 s, though the probes are
#    still held (they end with the worker, as on NFS), the log says why; with
#    the store back it starts and every row is there;
#  - with on_kms_outage = continue it keeps serving, unavailable, and is ok again once
#    the store answers.
# Outside the watchdog every read of a local key file has the provider's own deadline
# (option timeout_ms, default 10 s; 6 s here, longer than probe_timeout, so that the
# watchdog's phases show its probe deadline): pg_cmk status exits 4 (unavailable)
# and a server start fails with one FATAL line naming the store, each within
# timeout_ms + 3 s, instead of waiting for as long as the store hangs.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use CmkTest;

plan skip_all => 'the watchdog needs an encrypted cluster' if is_plain_mode();
my $fs      = $ENV{CMK_TEST_HANG_FS};
my $control = $ENV{CMK_TEST_HANG_CONTROL};
plan skip_all => 'no FUSE file system that can hang: '
  . ($ENV{CMK_TEST_HANG_FS_SKIP} // 'CMK_TEST_HANG_FS is not set (test/run_all.sh mounts one when run as root)')
  unless $fs && $control && -d $fs;

# probe_timeout, check_interval (s); kms_outage_grace: 2 s with on_kms_outage = continue,
# 4 s with shutdown. The grace counts from the last answer, so with a grace no longer
# than probe_timeout it is spent when the probe's deadline passes and the shutdown
# starts at the very moment the key turns unavailable: watchdog_status() would never
# be seen saying so. 4 s leaves it 2 s in which to be seen.
my ($timeout, $interval, $grace_cont, $grace) = (2, 1, 2, 4);

sub hang_key_store
{
	open(my $fh, '>', $control) or die "create $control: $!";
	close $fh;
}

sub release_key_store { unlink $control or die "unlink $control: $!" if -e $control; }

# Never leave the store held (a dying test would otherwise leave a server blocked).
END { unlink $control if $control && -e $control; }
release_key_store();

my $store = "$fs/keys-$$-" . int(rand(1e6));
mkdir($store, 0700) or die "mkdir $store: $!";
chmod 0700, $store or die "chmod $store: $!";

my $store_timeout_ms = 6000;
my $node = new_encrypted_node('lhang', key_store => $store, check_interval => "${interval}s",
	kms_options => { timeout_ms => $store_timeout_ms },
	conf => [ "cmk_lakebase.probe_timeout = '${timeout}s'", "cmk_lakebase.kms_outage_grace = '${grace}s'",
		"cmk_lakebase.on_kms_outage = 'shutdown'", 'log_statement = none' ], start => 1);
my $key_id = $node->{cmk_key_id};
my $keyfile = "$store/$key_id.key";
ok(-f $keyfile, "the key file is on the FUSE file system ($keyfile)");
$node->safe_psql('postgres', q{
	CREATE EXTENSION cmk_lakebase;
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g;
});
ok($node->poll_query_until('postgres',
		q{SELECT state = 'ok' AND checks > 0 AND NOT probe_in_flight FROM cmk_lakebase.watchdog_status()}),
	'healthy store: watchdog_status() is ok');

# The file system really holds a stat of the key file while hung (else this test would
# prove nothing): a child's stat does not finish within 1.5 s.
hang_key_store();
my $stat_done = eval {
	IPC::Run::run([ 'stat', $keyfile ], '>', \my $o, '2>', \my $e, IPC::Run::timeout(1.5));
	1;
};
ok(!$stat_done, 'hung store: a stat of the key file blocks');
release_key_store();
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'released: ok again');

# Polls watchdog_status() every 0.1 s (at most $limit s) and, given $pm, the postmaster:
# returns (seconds since $t0 at which it first reported unavailable with the probe in
# flight, seconds since $t0 at which $pm was gone), each undef if not seen; with $pm it
# goes on until the postmaster is gone. Checks the row that says unavailable, and that
# no row said ok with a last_check older than a probe could take.
sub wait_unavailable
{
	my ($t0, $limit, $pm) = @_;
	my ($frozen, $at, $gone);
	while (time - $t0 < $limit)
	{
		if ($pm && !pid_alive($pm)) { $gone = time - $t0; last }
		if (!defined $at)
		{
			my ($ret, $out) = $node->psql('postgres',
				q{SELECT state, probe_in_flight, probe_started IS NOT NULL,
				         extract(epoch FROM now() - probe_started), extract(epoch FROM now() - last_check)
				  FROM cmk_lakebase.watchdog_status()});
			if ($ret == 0 && $out)
			{
				my ($state, $in_flight, $started, $age, $last) = split /\|/, $out;
				$frozen = sprintf('state ok, last_check %.1f s ago', $last)
				  if $state eq 'ok' && $last > $timeout + $interval + 1;
				if ($state eq 'unavailable')
				{
					$at = time - $t0;
					is($in_flight, 't', 'watchdog_status: a probe is in flight');
					ok($started eq 't' && $age >= $timeout - 0.5,
						sprintf('watchdog_status: probe_started says since when (%.1f s ago)', $age || -1));
					last unless $pm;
				}
			}
		}
		sleep($at ? 0.05 : 0.1);
	}
	ok(!defined $frozen, 'never ok with a frozen last_check' . ($frozen ? " ($frozen)" : ''));
	return ($at, $gone);
}

# ---- hung store, on_kms_outage = shutdown ------------------------------------------
my $pm     = postmaster_pid($node);
my $logpos = -s $node->logfile;
my $t0     = time;
hang_key_store();
my $bound_unavail = $timeout + $interval + 2;
my $bound_down    = $timeout + $grace + $interval + 3;
my ($unavail, $gone) = wait_unavailable($t0, $bound_down + 30, $pm);
ok(defined $unavail, 'hung store: the watchdog turns unavailable');
$unavail //= 999;
note(sprintf('unavailable %.1f s after the store hung', $unavail));
cmp_ok($unavail, '<', $bound_unavail,
	sprintf('... within probe_timeout + check_interval + 2 s (%.1f s < %d s)', $unavail, $bound_unavail));
ok(defined $gone, 'hung store: the outage policy shuts the cluster down');
$gone //= 999;
note(sprintf('the postmaster was gone %.1f s after the store hung', $gone));
cmp_ok($gone, '<', $bound_down,
	sprintf('... within probe_timeout + kms_outage_grace + check_interval + 3 s (%.1f s < %d s)', $gone, $bound_down));
cmp_ok($gone, '>', $unavail, '... after it was seen unavailable, not before');
$node->{_pid} = undef;
my $log = slurp_file($node->logfile, $logpos);
like($log, qr/the probe of key "\Q$key_id\E" of provider "local" has not answered within probe_timeout \(${timeout} s\)/,
	'the log names key, provider and the deadline');
like($log, qr/unavailable for longer than kms_outage_grace \(${grace} s\) for key "\Q$key_id\E"; shutting the cluster down/,
	'the log says why it shuts down');
like($log, qr/received fast shutdown request/, 'a fast (clean) shutdown');
like($log, qr/database system is shut down/, 'the shutdown completes although probes are held');
unlike($log, qr/is revoked/, 'a hung store is never reported as a revocation');

# ---- the tools and a start while the store hangs: the key store's own deadline ------
my $bound_tool = $store_timeout_ms / 1000 + 3;
$t0 = time;
my ($src, $sout, $serr) = (undef, '', '');
my $sdone = eval {
	IPC::Run::run([ 'pg_cmk', 'status', '-D', $node->data_dir ], '<', \undef, '>', \$sout, '2>', \$serr,
		IPC::Run::timeout(30));
	$src = $? >> 8;
	1;
};
my $took = time - $t0;
note(sprintf('pg_cmk status with the store hung: %s after %.1f s', $sdone ? "exit $src" : 'no answer in 30 s', $took));
ok($sdone, 'pg_cmk status with the store hung: answers');
is($src, 4, '... exit 4 (the key is unavailable)');
cmp_ok($took, '<', $bound_tool, sprintf('... within timeout_ms + 3 s (%.1f s < %d s)', $took, $bound_tool));
like("$sout$serr", qr/did not answer within $store_timeout_ms ms/, '... and says the key store did not answer');

# A start: the postmaster reads the key file before it logs anything else; past the
# store's deadline it fails with one FATAL line and exits (it used to wait for as long
# as the store hung, holding postmaster.pid, deaf to pg_ctl stop).
$t0 = time;
my $ctl_rc = system_log('pg_ctl', '-D', $node->data_dir, '-l', $node->logfile, '-w', '-t', '30', 'start');
$took = time - $t0;
note(sprintf('pg_ctl start with the store hung: exit %d after %.1f s', $ctl_rc >> 8, $took));
isnt($ctl_rc, 0, 'a start with the store hung fails');
cmp_ok($took, '<', $bound_tool, sprintf('... within timeout_ms + 3 s (%.1f s < %d s)', $took, $bound_tool));
ok(!-e $node->data_dir . '/postmaster.pid', '... and leaves no postmaster behind');
like(slurp_file($node->logfile, $logpos),
	qr/FATAL:  cmk_lakebase: could not unwrap .*\n.*DETAIL: .*the local key store .* did not answer within $store_timeout_ms ms/,
	'... with a FATAL line, its detail says the key store did not answer');

release_key_store();
$node->start;
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '1000', 'every row is there');
unlike(slurp_file($node->logfile, $logpos), qr/not properly shut down/, 'no crash recovery after the outage shutdown');

# ---- hung store, on_kms_outage = continue -------------------------------------------
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.on_kms_outage = 'continue'");
$node->safe_psql('postgres', "ALTER SYSTEM SET cmk_lakebase.kms_outage_grace = '${grace_cont}s'");
$node->reload;
ok($node->poll_query_until('postgres',
		qq{SELECT state = 'ok' AND current_setting('cmk_lakebase.on_kms_outage') = 'continue'
		     AND current_setting('cmk_lakebase.kms_outage_grace') = '${grace_cont}s'
		   FROM cmk_lakebase.watchdog_status()}),
	"continue (grace ${grace_cont} s): ok before the hang");
$pm = postmaster_pid($node);
$t0 = time;
hang_key_store();
($unavail) = wait_unavailable($t0, $bound_unavail + 5);
ok(defined $unavail, 'continue: hung store, the watchdog turns unavailable');
note(sprintf('unavailable %.1f s after the store hung', $unavail // 999));
sleep $grace_cont + $interval + 1;    # past the grace: shutdown would have acted by now
ok(pid_alive($pm), 'continue: the server stays up past the grace');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '1000', 'continue: queries on existing tables answer');
$node->safe_psql('postgres', "INSERT INTO t VALUES (1001, 'during the hang')");
my ($state, $action) = split /\|/,
  $node->safe_psql('postgres', 'SELECT state, action FROM cmk_lakebase.watchdog_status()');
is($state, 'unavailable', 'continue: still unavailable while the store hangs');
is($action, 'continue (on_kms_outage = continue)', 'continue: action says so');

release_key_store();
ok($node->poll_query_until('postgres',
		q{SELECT state = 'ok' AND NOT probe_in_flight AND consecutive_failures = 0 FROM cmk_lakebase.watchdog_status()}),
	'store back: ok again, no probe in flight');
is($node->safe_psql('postgres', "SELECT v FROM t WHERE id = 1001"), 'during the hang', 'the write made during the hang is there');
$node->stop;

done_testing();
