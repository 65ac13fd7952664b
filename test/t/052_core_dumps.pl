# Core dumps (issue 18): processes that hold the cluster's keys - server processes, tools
# run through "pg_cmk exec", pg_cmk itself - are non-dumpable. As the cluster's own OS
# user, gcore (ptrace) of a backend and of a wrapped tool is refused and writes no core;
# a crashing wrapped tool leaves no kernel core file. The controls prove the checks can
# fail: with cmk_lakebase.allow_core_dumps = on, or "pg_cmk exec --allow-core-dumps",
# the same gcore succeeds and the same crash leaves a core.
#
# Root may ptrace any process, dumpable or not, so what root's gcore writes is what the
# allowed cores hold: gcore (gdb) writes every readable mapping except those marked
# MADV_DONTDUMP ("dd" in /proc/PID/smaps), whoever runs it. Those cores - of the
# checkpointer and of a client backend that have keyed relation files, and of
# pg_waldump under pg_cmk exec - are searched for every key of the cluster, learnt
# independently of the product (test/perl/cmk_core_keys.py: CMK, KEK, every DEK, the WAL
# master key and each segment's key), raw and as AES-256 key schedules computed by the
# helper's own key expansion: none may be there (the cipher contexts live in the key
# arena, src/core/base/key_arena.cpp). A control finds a DEK's schedule in the core of
# a process that holds it in an ordinary OpenSSL context (openssl enc).

use strict;
use warnings;

use File::Basename qw(dirname);
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

# small shared memory: the cores stay small enough to search quickly
my $node = new_encrypted_node('cores', conf => ['shared_buffers = 16MB']);
my $pgdata = $node->data_dir;
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
# larger than shared_buffers: a scan reads (and keys) the file in every backend
$node->safe_psql('postgres', 'CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 300000) g');
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

# Searches a core for the cluster's keys; returns (number of keys learnt, number found,
# the helper's report).
my $searcher = dirname($INC{'CmkTest.pm'}) . '/cmk_core_keys.py';
# the helper unseals keys with python3-cryptography (scripts/install_deps.sh installs it)
my $can_search = system('/usr/bin/python3', '-c', 'import cryptography') == 0;
sub search_core
{
	my ($core) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', $searcher, $pgdata, $node->{cmk_key_store}, $node->{cmk_key_id}, $core ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(600));
	die "cmk_core_keys.py failed: $err" if $? != 0;
	my ($keys) = $out =~ /^keys (\d+)$/m;
	my ($hits) = $out =~ /^hits (\d+)$/m;
	print "# $_\n" for grep { /^found/ } split /\n/, $out;
	return ($keys // 0, $hits // -1, $out);
}

# The DEK of one file, in hex (from the same independent helper, "--print IDENTITY").
sub learn_dek_hex
{
	my ($identity) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ '/usr/bin/python3', $searcher, $pgdata, $node->{cmk_key_store}, $node->{cmk_key_id}, '--print', $identity ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(120));
	chomp $out;
	return $out =~ /^[0-9a-f]{128}$/ ? $out : undef;
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
SKIP:
{
	skip 'no core to search', 2 unless defined $core;
	skip 'python3-cryptography is not installed: cannot learn the keys', 2 unless $can_search;
	my ($keys, $hits, $report) = search_core($core);
	cmp_ok($keys, '>', 10, "the cluster's keys learnt from the key store and the key map ($keys)");
	is($hits, 0, 'no key, raw or as an AES key schedule, in the core of the checkpointer');
	unlink $core;
}

# a client backend that has scanned t (through the layer: t is larger than shared_buffers)
my $t_file = $node->safe_psql('postgres', "SELECT pg_relation_filepath('t')");
my ($bin, $bout, $berr) = ('', '', '');
my $bh = IPC::Run::start([ 'psql', '-X', '-At', '-d', $node->connstr('postgres') ], '<', \$bin, '>', \$bout, '2>', \$berr,
	IPC::Run::timeout(300));
$bin .= "SELECT 'scanned ' || count(*) FROM t;\nSELECT pg_backend_pid();\n";
IPC::Run::pump($bh) until $bout =~ /scanned 300000\n(\d+)\n/ || !$bh->pumpable;
my $bpid = $1;
ok(defined $bpid, 'a client backend scanned the encrypted table') or diag($berr);

# The postmaster, and every process it forks, stays single-threaded: glibc marks a process
# that ever started a thread as multi-threaded for good (its children too), and each
# cancellable system call then takes glibc's slower cancellation path. The key read at
# start with its deadline runs in a reader process, not a thread (src/core/kms/local.cpp).
my ($pm_pid) = split /\n/, slurp_file("$pgdata/postmaster.pid");
is(single_threaded($pm_pid), 1, 'the postmaster is single-threaded (glibc\'s __libc_single_threaded)');
is(single_threaded($bpid // 0), 1, '... and so is a backend it forked');
($rc, $core) = gcore('backend_allowed', $bpid // 0);
ok(defined $core, 'gcore of the client backend (allow_core_dumps = on) writes a core');
SKIP:
{
	skip 'no core to search', 2 unless defined $core;
	skip 'python3-cryptography is not installed: cannot learn the keys', 2 unless $can_search;
	my ($keys, $hits, $report) = search_core($core);
	is($hits, 0, "no key, raw or as an AES key schedule, in the core of a backend that read $t_file");
	# control: the search finds a DEK's schedule where OpenSSL keeps it on the heap
	my ($dek_hex) = learn_dek_hex($t_file);
	SKIP:
	{
		skip 'openssl(1) is not installed', 1 unless defined $dek_hex && grep { -x "$_/openssl" } split /:/, $ENV{PATH};
		my ($oin, $oout) = ('', '');
		my $oh = IPC::Run::start([ 'openssl', 'enc', '-aes-256-ecb', '-nosalt', '-K', substr($dek_hex, 0, 64) ],
			'<', \$oin, '>', \$oout);
		$oin .= 'x' x 64;    # keyed and encrypting; then waits on stdin
		IPC::Run::pump_nb($oh) for 1 .. 20;
		select(undef, undef, undef, 0.5);
		my (undef, $ocore) = gcore('openssl', $oh->{KIDS}[0]{PID});
		my (undef, $ohits, $oreport) = defined $ocore ? search_core($ocore) : (0, 0, '');
		like($oreport, qr/^found dek \Q$t_file\E: [1-9]\d* round keys/m,
			"control: the same search finds the DEK of $t_file in an ordinary OpenSSL context's core");
		$oh->kill_kill;
		unlink $ocore if defined $ocore;
	}
	unlink $core;
}
$bin .= "\\q\n";
$bh->finish;
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
SKIP:
{
	skip 'no core to search', 1 unless defined $core;
	skip 'python3-cryptography is not installed: cannot learn the keys', 1 unless $can_search;
	my ($keys, $hits, $report) = search_core($core);
	is($hits, 0, 'no key, raw or as an AES key schedule, in the core of pg_waldump under pg_cmk exec');
	unlink $core;
}
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
