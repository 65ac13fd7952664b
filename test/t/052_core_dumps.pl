# Core dumps (issue 18): processes that hold the cluster's keys - server processes, tools
# run through "pg_cmk exec", pg_cmk itself - are non-dumpable. As the cluster's own OS
# user, gcore (ptrace) of a backend and of a wrapped tool is refused and writes no core;
# a crashing wrapped tool leaves no kernel core file. The controls prove the checks can
# fail: with cmk_lakebase.allow_core_dumps = on, or "pg_cmk exec --allow-core-dumps",
# the same gcore succeeds and the same crash leaves a core.
#
# What this does not cover (docs/threat-model.md): root, who may ptrace any process and
# read its memory directly, gets the cipher key schedules from a gcore of a server
# process (the raw keys are in MADV_DONTDUMP memory, the OpenSSL contexts on the heap).

use strict;
use warnings;

use File::Temp ();
use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

plan skip_all => 'gcore (gdb) is not installed' unless grep { -x "$_/gcore" } split /:/, $ENV{PATH};
plan skip_all => 'runs as the cluster\'s own (non-root) user' if $> == 0;

# Yama's ptrace_scope >= 1 refuses gcore of a non-child whatever the dumpable flag: the
# gcore checks (and their controls) need the classic ptrace rule
sub first_line
{
	my ($path) = @_;
	open(my $fh, '<', $path) or return undef;
	my $line = <$fh> // '';
	chomp $line;
	return $line;
}
my $yama = first_line('/proc/sys/kernel/yama/ptrace_scope') // 0;
plan skip_all => "Yama ptrace_scope is $yama (gcore of a non-child is refused for every process)" if $yama > 0;

# gcore must work at all here (a seccomp profile may forbid ptrace): a plain process of
# the same user first
{
	my $probe_dir = PostgreSQL::Test::Utils::tempdir();
	my $sleeper = IPC::Run::start([ 'sleep', '60' ]);
	my $spid = $sleeper->{KIDS}[0]{PID};
	IPC::Run::run([ 'gcore', '-o', "$probe_dir/probe", $spid ], '<', \undef, '>', \my $o, '2>', \my $e,
		IPC::Run::timeout(60));
	$sleeper->kill_kill;
	plan skip_all => "gcore does not work on this machine even for a plain process: $e" unless -s "$probe_dir/probe.$spid";
}

my $node = new_encrypted_node('cores');
my $pgdata = $node->data_dir;
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
$node->safe_psql('postgres', 'CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 10000) g');
$node->safe_psql('postgres', 'CHECKPOINT');

my $tmp = PostgreSQL::Test::Utils::tempdir();

# gcore PID into $tmp/NAME.PID; returns (gcore's exit status, the core file or undef).
sub gcore
{
	my ($name, $pid) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'gcore', '-o', "$tmp/$name", $pid ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(120));
	my $rc = $? >> 8;
	print "# gcore $pid: rc=$rc\n# $err\n";
	my $core = "$tmp/$name.$pid";
	return ($rc, -s $core ? $core : undef);
}

sub checkpointer_pid
{
	my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'");
	# it has opened (and keyed) relation files during the checkpoint
	$node->safe_psql('postgres', 'UPDATE t SET v = v WHERE id < 100; CHECKPOINT');
	return $pid;
}

# --- a server process (the checkpointer, which keys every file it writes)
my $pid = checkpointer_pid();
my ($rc, $core) = gcore('ckpt', $pid);
ok(!defined $core, 'gcore of the checkpointer as the cluster\'s user writes no core');
isnt($rc, 0, '... gcore fails (the process is not dumpable)');

$node->append_conf('postgresql.conf', "cmk_lakebase.allow_core_dumps = on\n");
$node->restart;
$pid = checkpointer_pid();
($rc, $core) = gcore('ckpt_allowed', $pid);
ok(defined $core, 'control: with allow_core_dumps = on the same gcore writes a core');
unlink $core if defined $core;
$node->append_conf('postgresql.conf', "cmk_lakebase.allow_core_dumps = off\n");
$node->restart;

# --- a tool under the layer: pg_waldump --follow reads the encrypted WAL, then waits
my $segment = $node->safe_psql('postgres', 'SELECT pg_walfile_name(pg_current_wal_lsn())');
sub start_tool
{
	my (@exec_opts) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'pg_cmk', 'exec', @exec_opts, '-D', $pgdata, '--', 'pg_waldump', '--follow', '-p', "$pgdata/pg_wal", $segment ],
		'<', \undef, '>', \$out, '2>', \$err);
	# pg_cmk execs the tool: the pid is the tool's; wait until it has read the WAL
	for (1 .. 100)
	{
		last if length($out) > 0;
		IPC::Run::pump_nb($h);
		select(undef, undef, undef, 0.1);
	}
	ok(length($out) > 0, "pg_waldump --follow @exec_opts decodes the encrypted WAL under the layer")
	  or diag($err);
	return ($h, $h->{KIDS}[0]{PID});
}

my ($h, $tpid) = start_tool();
($rc, $core) = gcore('tool', $tpid);
ok(!defined $core, 'gcore of a tool under pg_cmk exec writes no core');
isnt($rc, 0, '... gcore fails (the tool is not dumpable)');
$h->kill_kill;

($h, $tpid) = start_tool('--allow-core-dumps');
($rc, $core) = gcore('tool_allowed', $tpid);
ok(defined $core, 'control: with --allow-core-dumps the same gcore writes a core');
unlink $core if defined $core;
$h->kill_kill;

# --- a crashing tool and the kernel's core file (only where cores go to a plain file
# in the working directory: core_pattern is the machine's, not the test's)
my $pattern = first_line('/proc/sys/kernel/core_pattern') // '';
SKIP:
{
	skip "core_pattern \"$pattern\" is not a plain file name", 2 if $pattern eq '' || $pattern =~ m{[|/%]};
	my $hard = `sh -c 'ulimit -H -c'`;
	chomp $hard;
	skip "the hard core size limit is $hard, not unlimited", 2 if $hard ne 'unlimited';
	for my $case ([ 'default', [] ], [ 'allowed', ['--allow-core-dumps'] ])
	{
		my ($label, $opts) = @$case;
		my $dir = "$tmp/crash_$label";
		mkdir $dir or die;
		my $cmd = "ulimit -c unlimited && cd $dir && exec pg_cmk exec @$opts -D $pgdata -- pg_waldump --follow -p $pgdata/pg_wal $segment >/dev/null 2>&1";
		my $ch = IPC::Run::start([ 'sh', '-c', $cmd ]);
		sleep 2;
		kill 'SEGV', $ch->{KIDS}[0]{PID};
		eval { $ch->finish; };
		opendir(my $d, $dir) or die;
		my @cores = grep { /^\Q$pattern\E/ } readdir $d;
		closedir $d;
		if ($label eq 'default')
		{
			is_deeply(\@cores, [], 'a wrapped tool killed by SIGSEGV leaves no core file');
		}
		else
		{
			ok(@cores > 0, 'control: with --allow-core-dumps the same crash leaves a core file');
		}
	}
}

$node->stop;
done_testing();
