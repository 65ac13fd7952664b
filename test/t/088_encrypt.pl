# `pg_cmk encrypt`: offline conversion of a plaintext cluster into an encrypted one
# (issue 17 item 4; docs/encrypt.md).
#   - refusals, one line each: a running cluster, one not cleanly shut down,
#     shared_preload_libraries already set, user tablespaces;
#   - the conversion is killed with SIGKILL at random points, and at each named step
#     (test hooks), and resumed by running the same command until it completes; after
#     each kill, neither the original nor the staging directory starts (plain, or with
#     the layer);
#   - the result starts under the layer: row checksums match those taken before, a
#     prepared transaction survives and commits, pg_amcheck is clean, the marker is
#     found nowhere in the data directory (and is found in the kept plaintext original:
#     the scan's control), `pg_cmk status` is clean;
#   - the CMK disabled: the converted cluster does not start;
#   - --remove-original removes the original (a second, small conversion).
use strict;
use warnings;

use File::Find ();
use File::Path qw(rmtree);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(sleep time);

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();

my $marker = 'CMKENCRYPT' . int(rand(1_000_000_000));
my $store  = CmkTest::new_key_store();
my $key    = CmkTest::create_key($store);
my $scale  = $ENV{CMK_ENCRYPT_TEST_SCALE} // 5;

my $node = CmkTest::new_plain_node('conv', conf => [ 'max_prepared_transactions = 5' ]);
$node->start;
$node->safe_psql('postgres',
	"CREATE TABLE marked (id int PRIMARY KEY, v text);
	 INSERT INTO marked SELECT g, '$marker-' || g || repeat('z', 50) FROM generate_series(1, 5000) g;
	 CREATE INDEX ON marked (v);");
$node->command_ok([ 'pgbench', '-i', '-s', $scale, '-q', $node->connstr('postgres') ], "pgbench -i -s $scale");
$node->safe_psql('postgres',
	"UPDATE pgbench_accounts SET abalance = aid % 977 WHERE aid % 7 = 0;
	 BEGIN; INSERT INTO marked VALUES (0, '$marker-prepared'); PREPARE TRANSACTION 'conv_2pc';");

my %sums_sql = (
	accounts => "SELECT md5(string_agg(aid || ':' || bid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
	branches => "SELECT md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches",
	marked   => "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM marked",
	catalog  => "SELECT md5(string_agg(relname || ':' || relkind::text, ',' ORDER BY relname)) FROM pg_class");
my %before = map { $_ => $node->safe_psql('postgres', $sums_sql{$_}) } keys %sums_sql;
$node->stop;

my $dir     = $node->data_dir;
my $staging = "$dir.encrypting";
my $orig    = "$dir.plaintext";
my $mark    = "$dir/global/pg_control.pg_cmk-encrypting";
my $bytes   = 0;
File::Find::find(sub { $bytes += -s $_ if -f $_ }, $dir);

sub encrypt
{
	return CmkTest::pg_cmk('encrypt', '-D', $dir, '--key-store', $store, '--key-id', $key, @_);
}

# --- refusals ------------------------------------------------------------------------
$node->start;
my ($rc, $out, $err) = encrypt();
isnt($rc, 0, 'a running cluster is refused');
like($err, qr/a server is running .*postmaster\.pid exists/, '... saying postmaster.pid exists');
$node->stop('immediate');
($rc, $out, $err) = encrypt();
isnt($rc, 0, 'a cluster not cleanly shut down is refused');
like($err, qr/postmaster\.pid|not shut down cleanly/, '... saying so');
unlink "$dir/postmaster.pid";
like($err, qr/was not shut down cleanly \(pg_control state: in production\)/,
	'pg_control\'s state is what refuses it (an immediate stop leaves no postmaster.pid)');
$node->start;
$node->stop;

my $auto = slurp_file("$dir/postgresql.auto.conf");
$node->append_conf('postgresql.auto.conf', "shared_preload_libraries = 'pg_stat_statements'\n");
($rc, $out, $err) = encrypt();
like($err, qr/postgresql\.auto\.conf sets shared_preload_libraries.*not supported/,
	'shared_preload_libraries already set is refused (not supported)');
open(my $fh, '>', "$dir/postgresql.auto.conf") or die;
print $fh $auto;
close $fh;

my $ts = PostgreSQL::Test::Utils::tempdir('ts');
symlink($ts, "$dir/pg_tblspc/99999") or die "symlink: $!";
($rc, $out, $err) = encrypt();
like($err, qr/user tablespaces .*not supported/, 'user tablespaces are refused (not supported)');
unlink "$dir/pg_tblspc/99999";
symlink($dir, "$dir.link") or die "symlink: $!";
($rc, $out, $err) = CmkTest::pg_cmk('encrypt', '-D', "$dir.link", '--key-store', $store, '--key-id', $key);
like($err, qr/is a symbolic link; give the data directory's real path/, 'a data directory given by a symbolic link is refused');
unlink "$dir.link";
ok(!-e $staging && !-e $mark, 'the refusals left nothing behind');

# --- killed at named steps, each resumed by the next run ------------------------------
# The swap's steps are short: random kills rarely land in them, so each is forced once,
# in order (each run resumes the previous one and gets one step further).
my @steps = qw(encrypt:after_mark encrypt:after_staging encrypt:after_copy encrypt:after_control
  encrypt:before_swap encrypt:after_original_aside encrypt:after_swap encrypt:after_activate);
my $half_refused = 0;
my $half_checked = 0;
my $startable    = 0;

# Every directory of a conversion in progress: DIR while it lacks global/pg_control
# (the original while converting, or the encrypted one before its activation) and the
# staging directory. Neither may start, without the layer or with it.
sub check_half_converted
{
	my ($when) = @_;
	my $port = $node->port;
	my $sock = $node->host;
	# a DIR that has pg_control is the untouched original (no staging yet) or the result
	$startable++
	  if -f "$dir/global/pg_control" && -d $staging && !-f "$dir/cmk_lakebase/keyring.json";
	for my $d ($dir, $staging)
	{
		next unless -d $d && !-f "$d/global/pg_control";
		for my $with_layer (0, 1)
		{
			my $o = "-p $port -k $sock" . ($with_layer ? " -c shared_preload_libraries=cmk_lakebase" : '');
			my $log = PostgreSQL::Test::Utils::tempdir('startlog') . '/log';
			my $r = system_log('pg_ctl', '-D', $d, '-l', $log, '-w', '-t', '20', '-o', $o, 'start');
			$half_checked++;
			if ($r == 0)
			{
				system_log('pg_ctl', '-D', $d, '-m', 'immediate', 'stop');
				fail("$when: $d started " . ($with_layer ? 'with' : 'without') . ' the layer while half-converted');
			}
			else
			{
				$half_refused++;
			}
			unlink "$d/postmaster.pid";
		}
	}
}

for my $step (@steps)
{
	local $ENV{CMK_LAKEBASE_TEST_HOOKS}    = 1;
	local $ENV{CMK_LAKEBASE_TEST_CRASH_AT} = $step;
	($rc, $out, $err) = encrypt();
	is($rc, 137, "killed at $step") or diag($err);
	ok(!-e $dir && -d $orig && -d $staging, 'after the original was set aside, DIR is absent')
	  if $step eq 'encrypt:after_original_aside';
	ok(-f "$dir/cmk_lakebase/keyring.json" && !-e "$dir/global/pg_control", 'after the swap, DIR is not yet startable')
	  if $step eq 'encrypt:after_swap';
	check_half_converted($step);
}
($rc, $out, $err) = encrypt();
is($rc, 0, 'the next run completes the conversion') or diag($err);
like($out, qr/cluster encrypted \(an interrupted conversion, completed\)/, '... and says it completed an earlier run');
like($out, qr/PLAINTEXT original .*kept at\s+\Q$orig\E/s, '... and says loudly where the plaintext original is');
ok(-f "$dir/cmk_lakebase/keyring.json" && -f "$dir/global/pg_control" && -f "$orig/global/pg_control" && !-e $staging,
	'encrypted at DIR, the original back to a usable plaintext cluster at DIR.plaintext');

# --- start over from the plaintext original, killed at random points ------------------
# (the named steps above end with an encrypted cluster; the random kills below convert
# the same plaintext original again, resuming after every SIGKILL)
rmtree($dir);
rename($orig, $dir) or die "rename: $!";
my $t0 = time;
my ($kills, $runs, $done) = (0, 0, 0);
my $max_delay = 0.15;
my $journal   = "$staging/pg_cmk_encrypt.journal";

sub staged_bytes
{
	my $n = 0;
	File::Find::find({ wanted => sub { $n += (-s $_ // 0) if -f $_ }, no_chdir => 0 }, $staging) if -d $staging;
	return $n;
}

sub journal_lines
{
	open(my $f, '<', $journal) or return 0;
	my $n = 0;
	$n++ while <$f>;
	close $f;
	return $n;
}
while (!$done && $runs < 60)
{
	$runs++;
	my ($o, $e) = ('', '');
	my @cmd = ('pg_cmk', 'encrypt', '-D', $dir, '--key-store', $store, '--key-id', $key);
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>', \$o, '2>', \$e);
	my $t_start = time;
	my $how;
	if ($runs % 2)
	{
		# at a random time early in the run (start-up, keyring, the first files)
		my $delay = 0.02 + rand($max_delay);
		$how = sprintf('after %.3f s', $delay);
		while (time < $t_start + $delay && $h->pumpable) { $h->pump_nb; sleep 0.005; }
	}
	else
	{
		# in the middle of the copy: once the staging directory has grown by a random
		# 5-35 % of the cluster's size (wherever that falls: inside a file, between a
		# file and its journal record, ...)
		my $target = staged_bytes() + (0.05 + rand(0.30)) * $bytes;
		while (staged_bytes() < $target && $h->pumpable && time < $t_start + 60) { $h->pump_nb; sleep 0.005; }
		$how = sprintf('at %.1f MB staged (target %.1f MB), %d files journaled',
			staged_bytes() / 1e6, $target / 1e6, journal_lines());
	}
	if ($runs <= 8 && $h->pumpable)
	{
		$h->signal('KILL');
		$h->finish;
		$kills++;
		note("run $runs: killed $how");
		check_half_converted("random kill $kills");
		next;
	}
	$h->finish;
	my $code = $h->result(0);
	print "# run $runs: rc=$code\n# $o\n# $e\n";
	$done = $code == 0 && -f "$dir/cmk_lakebase/keyring.json";
	fail("run $runs failed: $e") if $code != 0;
}
my $elapsed = time - $t0;
ok($done, "converted after $kills random kills and $runs runs");
cmp_ok($kills, '>=', 3, 'at least 3 random kills landed before completion');
cmp_ok($half_checked, '>', 0, 'half-converted directories were tried');
is($half_refused, $half_checked, "none of the $half_checked starts on a half-converted directory succeeded");
is($startable, 0, 'DIR never had a pg_control while a staging directory existed (outside the swap)');

# --- the converted cluster ----------------------------------------------------------
($rc, $out, $err) = encrypt();
like($err, qr/already encrypted by cmk_lakebase/, 'a converted cluster is refused as already encrypted');
($rc, $out, $err) = CmkTest::pg_cmk('status', '-D', $dir);
is($rc, 0, 'pg_cmk status: key usable, every data file has a key') or diag($out . $err);

my ($started, $log) = CmkTest::try_start($node);
ok($started, 'the converted cluster starts under the layer') or diag($log);
for my $k (sort keys %sums_sql)
{
	is($node->safe_psql('postgres', $sums_sql{$k}), $before{$k}, "row checksum of $k as before");
}
$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
is($node->safe_psql('postgres', 'SELECT layer_mode FROM cmk_lakebase.cmk_status()'), 'got', 'the layer serves it');
is($node->safe_psql('postgres', "SELECT gid FROM pg_prepared_xacts"), 'conv_2pc', 'the prepared transaction survived');
$node->safe_psql('postgres', "COMMIT PREPARED 'conv_2pc'");
is($node->safe_psql('postgres', "SELECT v FROM marked WHERE id = 0"), "$marker-prepared", '... and commits');
$node->safe_psql('postgres', 'CHECKPOINT');
my $amcheck = `pg_amcheck -h @{[$node->host]} -p @{[$node->port]} -d postgres --install-missing --heapallindexed 2>&1`;
is($?, 0, 'pg_amcheck is clean') or diag($amcheck);
$node->command_ok([ 'pgbench', '-n', '-t', '200', $node->connstr('postgres') ], 'pgbench runs on it');
$node->stop;

my @hits = CmkTest::scan_for_markers($dir, $marker);
is(scalar(@hits), 0, 'the marker is found nowhere in the converted data directory') or diag(join("\n", @hits));
my @control = CmkTest::scan_for_markers($orig, $marker);
cmp_ok(scalar(@control), '>', 0, 'the same scan finds it in the plaintext original (control)');

($rc) = CmkTest::pg_cmk('key', 'disable', $key, '--key-store', $store);
is($rc, 0, 'CMK disabled');
($started, $log) = CmkTest::try_start($node);
ok(!$started, 'the converted cluster does not start with its CMK disabled');
like($log, qr/could not unwrap|disabled/, '... the log says why');
CmkTest::pg_cmk('key', 'enable', $key, '--key-store', $store);

# --- --remove-original, on a small cluster --------------------------------------------
my $small = CmkTest::new_plain_node('small');
$small->start;
$small->safe_psql('postgres', "CREATE TABLE s AS SELECT '$marker' || g AS v FROM generate_series(1, 100) g");
$small->stop;
($rc, $out, $err) = CmkTest::pg_cmk('encrypt', '-D', $small->data_dir, '--key-store', $store, '--remove-original');
is($rc, 0, 'pg_cmk encrypt --remove-original') or diag($err);
ok(!-e $small->data_dir . '.plaintext', '... leaves no plaintext original');
unlike($out, qr/PLAINTEXT original/, '... and warns of none');
$small->start;
is($small->safe_psql('postgres', 'SELECT count(*) FROM s'), '100', 'the small converted cluster serves its rows');
$small->stop;
is(scalar(CmkTest::scan_for_markers($small->data_dir, $marker)), 0, '... and holds no marker');

my $mb = $bytes / 1e6;
diag(sprintf('converted %.1f MB with %d random kills in %.1f s of wall time, resumes included', $mb, $kills, $elapsed));

done_testing();
