# Major-version upgrade (issue 17): an encrypted PostgreSQL 15 cluster upgraded with
# "pg_cmk upgrade" (the stock pg_upgrade of the version under test) into a new
# encrypted cluster under the same CMK, in --copy and in --link mode; and a plaintext
# 15 cluster upgraded with --copy into an encrypted one (the adoption path).
#
# Runs on the newer versions only (test/run_version.sh, inside their root filesystems,
# which also carry Debian 12's PostgreSQL 15 and the extension's 15 build). The old
# cluster holds pgbench tables, a table with a marker in its rows and in TOAST, an
# index, a sequence, a materialized view, a second database, a user tablespace and
# multixacts. After each upgrade: every table's checksum equals the old one,
# pg_amcheck --heapallindexed is clean, the marker is nowhere in the new data directory
# or its tablespace directory (and is in the plaintext old cluster: the control),
# rotate_kek() works, the kill switch stops the new cluster when the CMK is disabled
# and it starts again with its rows when enabled. --clone runs where run_all.sh could
# make a filesystem with reflinks (XFS on a loop device). Refused before anything is done:
# --swap, --link from a plaintext cluster, a running cluster.

use strict;
use warnings;

use Cwd qw(getcwd realpath);
use File::Basename qw(basename dirname);
use File::Copy qw(copy);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $old_bindir = '/usr/lib/postgresql/15/bin';
my $new_bindir = $ENV{PG_BINDIR} // $old_bindir;

my $probe = PostgreSQL::Test::Cluster->new('probe');
my $major = $probe->pg_version->major;
plan skip_all => "an upgrade from 15 needs a newer server (this run is PostgreSQL $major)"
  if $major <= 15;
plan skip_all => "no PostgreSQL 15 with the extension's 15 build in $old_bindir"
  unless -x "$old_bindir/postgres" && -x "$old_bindir/pg_cmk";
plan skip_all => 'plaintext mode (CMK_TEST_PLAIN)' if is_plain_mode();

# 19 (release candidate): pg_upgrade converts pg_multixact itself, reading the old
# cluster's files, so pg_cmk upgrade refuses 15 -> 19 before anything runs.
if ($major >= 19)
{
	my $store0 = new_key_store();
	my $key0   = create_key($store0);
	my $old = new_encrypted_node('old19', key_store => $store0, key_id => $key0);
	my $new = new_encrypted_node('new19', key_store => $store0, key_id => $key0);
	my ($out, $err) = ('', '');
	# the old cluster here is a 19 one too: the refusal is checked on a 15 data
	# directory's version file
	open(my $fh, '>', $old->data_dir . '/PG_VERSION') or die $!;
	print $fh "15\n";
	close $fh;
	IPC::Run::run([ 'pg_cmk', 'upgrade', '-d', $old->data_dir, '-D', $new->data_dir, '-b', $old_bindir,
			'-B', $new_bindir ], '<', \undef, '>', \$out, '2>', \$err);
	isnt($?, 0, "PostgreSQL $major: pg_cmk upgrade from 15 is refused");
	like($err, qr/is not supported yet: pg_upgrade $major converts pg_multixact/, '... saying why');
	ok(!-e $new->data_dir . '/pg_upgrade_output.d', '... before pg_upgrade runs');
	done_testing();
	exit 0;
}

my $marker = 'CMKUPGRADEMARKER' . int(rand(1e9));

# PostgreSQL::Test::Cluster runs an install_path node's initdb by its full path: a
# directory of links to the 15 bindir whose initdb is the test wrapper (pg_cmk initdb,
# found first in PATH as the 15 build's pg_cmk).
my $inst = PostgreSQL::Test::Utils::tempdir('pg15');
mkdir "$inst/bin" or die "$inst/bin: $!";
for my $f (glob "$old_bindir/*")
{
	next if basename($f) eq 'initdb';
	symlink($f, "$inst/bin/" . basename($f)) or die "symlink $f: $!";
}
my $wrapper = dirname(__FILE__) . '/../bin/initdb';
copy($wrapper, "$inst/bin/initdb") or die "copy $wrapper: $!";
chmod 0755, "$inst/bin/initdb";

my $store = new_key_store();
my $key   = create_key($store);

my @tables = qw(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history marked);

sub checksums
{
	my ($node) = @_;
	my %sum;
	for my $t (@tables)
	{
		$sum{$t} = $node->safe_psql('postgres',
			"SELECT count(*) || ':' || md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM $t x");
	}
	$sum{other} = $node->safe_psql('other',
		"SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM spaced x");
	$sum{seq} = $node->safe_psql('postgres', 'SELECT last_value FROM marked_seq');
	$sum{mv}  = $node->safe_psql('postgres', q{SELECT count(*) || ':' || sum(n) FROM marked_mv});
	return \%sum;
}

# An old 15 cluster, encrypted (through $inst) or plaintext, with the same data.
sub old_cluster
{
	my ($name, $plain) = @_;
	my $tsdir = PostgreSQL::Test::Utils::tempdir("ts_$name");
	my $node =
	  $plain
	  ? new_plain_node($name, node => { install_path => '/usr/lib/postgresql/15' })
	  : new_encrypted_node(
		$name,
		key_store => $store,
		key_id    => $key,
		extra     => ['-k'],
		node      => { install_path => $inst });
	$node->append_conf('postgresql.conf', "max_prepared_transactions = 0\n");
	$node->start;
	is($node->safe_psql('postgres', 'SHOW server_version_num') =~ /^15/ ? 15 : 0,
		15, "$name: the old cluster runs PostgreSQL 15");
	$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase') unless $plain;
	$node->command_ok([ 'pgbench', '-i', '-s', '3', '-q', '-p', $node->port, '-h', $node->host, 'postgres' ],
		"$name: pgbench -i");
	$node->command_ok(
		[ 'pgbench', '-n', '-t', '300', '-c', '2', '-p', $node->port, '-h', $node->host, 'postgres' ],
		"$name: pgbench run");
	$node->safe_psql(
		'postgres', qq{
		CREATE SEQUENCE marked_seq;
		CREATE TABLE marked (id int PRIMARY KEY, note text, big text);
		INSERT INTO marked
		  SELECT g, '$marker row ' || g || repeat(' pad', 20), CASE WHEN g % 50 = 0
		    THEN (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 200) i) || '$marker'
		  END
		  FROM generate_series(1, 5000) g;
		ALTER TABLE marked ALTER COLUMN big SET STORAGE EXTERNAL;
		UPDATE marked SET big = big || '' WHERE big IS NOT NULL;
		CREATE INDEX marked_note ON marked (note);
		SELECT nextval('marked_seq') FROM generate_series(1, 42);
		CREATE MATERIALIZED VIEW marked_mv AS SELECT id % 10 AS k, count(*) AS n FROM marked GROUP BY 1;
		CREATE TABLESPACE spc LOCATION '$tsdir';
		CREATE DATABASE other;
	});
	$node->safe_psql(
		'other', qq{
		CREATE TABLE spaced (id int, note text) TABLESPACE spc;
		INSERT INTO spaced SELECT g, '$marker spaced ' || g FROM generate_series(1, 3000) g;
		CREATE INDEX spaced_id ON spaced (id) TABLESPACE spc;
	});
	# Multixacts: two sessions share a row lock on the same rows.
	my $s1 = $node->background_psql('postgres');
	$s1->query_safe('BEGIN');
	$s1->query_safe('SELECT * FROM pgbench_branches FOR SHARE');
	$node->safe_psql('postgres', 'SELECT * FROM pgbench_branches FOR SHARE');
	$s1->query_safe('COMMIT');
	$s1->quit;
	$node->safe_psql('postgres', 'CHECKPOINT');
	my $sums = checksums($node);
	$node->stop;
	return ($node, $sums, $tsdir);
}

sub new_cluster
{
	my ($name) = @_;
	return new_encrypted_node(
		$name,
		key_store => $store,
		key_id    => $key,
		extra     => ['-k'],
		conf      => "cmk_lakebase.check_interval = '1s'");
}

# pg_cmk upgrade from a scratch working directory (pg_upgrade puts its sockets there).
sub upgrade
{
	my ($old, $new, @opts) = @_;
	my $cwd  = getcwd();
	my $work = PostgreSQL::Test::Utils::tempdir('up');
	chdir $work or die "chdir $work: $!";
	my ($out, $err) = ('', '');
	my @cmd = (
		'pg_cmk', 'upgrade', '-d', $old->data_dir, '-D', $new->data_dir, '-b', $old_bindir, '-B', $new_bindir,
		@opts);
	note("running: @cmd");
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(900));
	my $rc = $? >> 8;
	chdir $cwd;
	note("rc=$rc\nstdout:\n$out\nstderr:\n$err");
	return ($rc, $out, $err);
}

sub check_new
{
	my ($label, $new, $sums, $tsdir) = @_;
	$new->start;
	is_deeply(checksums($new), $sums, "$label: every table, the sequence and the view are as before the upgrade");
	like($new->safe_psql('postgres', 'SHOW server_version_num'), qr/^$major/, "$label: the new cluster runs $major");
	$new->command_ok(
		[ 'pg_amcheck', '--all', '--install-missing', '--heapallindexed', '-p', $new->port, '-h', $new->host ],
		"$label: pg_amcheck --heapallindexed is clean");
	is($new->safe_psql('postgres', q{SELECT count(*) FROM cmk_lakebase.cmk_status()}) > 0,
		1, "$label: the extension answers in the new cluster");
	$new->safe_psql('postgres', 'CHECKPOINT');
	$new->stop;
	# (real paths: the --clone case keeps both on another filesystem behind symlinks)
	my @hits = (scan_for_markers(realpath($new->data_dir), $marker), scan_for_markers(realpath($tsdir), $marker));
	# In --copy mode the old cluster's own files stay in the tablespace directory
	# (PG_15_*): only the new version's directory belongs to the new cluster.
	@hits = grep { !m{/PG_15_} } @hits;
	is_deeply(\@hits, [], "$label: the marker is nowhere in the new cluster's files");
	$new->start;
	my $gen0 = $new->safe_psql('postgres', 'SELECT kek_generation FROM cmk_lakebase.cmk_status()');
	my $gen1 = $new->safe_psql('postgres', 'SELECT kek_generation FROM cmk_lakebase.rotate_kek()');
	is($gen1, $gen0 + 1, "$label: rotate_kek() works on the new cluster");
	$new->safe_psql('postgres', 'INSERT INTO marked VALUES (100001, \'after upgrade\', NULL)');
	$new->restart;
	is($new->safe_psql('postgres', 'SELECT count(*) FROM marked'), 5001, "$label: rows written after the rotation survive a restart");
}

sub kill_switch
{
	my ($label, $new) = @_;
	$new->start unless node_is_running($new);
	pg_cmk('key', 'disable', $key, '--key-store', $store);
	my $deadline = time + 30;
	sleep 1 while node_is_running($new) && time < $deadline;
	ok(!node_is_running($new), "$label: disabling the CMK stops the new cluster (watchdog)");
	$new->{_pid} = undef;
	my ($started) = try_start($new);
	ok(!$started, "$label: it does not start while the CMK is disabled");
	pg_cmk('key', 'enable', $key, '--key-store', $store);
	start_after_crash($new);
	is($new->safe_psql('postgres', 'SELECT count(*) FROM marked'), 5001, "$label: enabled again, it starts with its rows");
	$new->stop;
}

# --- refusals, before anything is done
{
	my ($old, undef, undef) = old_cluster('refold', 0);
	my $new = new_cluster('refnew');
	my ($rc, $out, $err) = upgrade($old, $new, '--swap');
	isnt($rc, 0, '--swap is refused');
	like($err, qr/does not support --swap/, 'with a reason');
	$old->start;
	($rc, $out, $err) = upgrade($old, $new, '--link');
	isnt($rc, 0, 'a running old cluster is refused');
	like($err, qr/postmaster\.pid: stop it first/, 'with what to do');
	$old->stop;
	ok(!-e $new->data_dir . '/pg_upgrade_output.d', 'nothing was run in the new cluster');
	my ($plain) = old_cluster('refplain', 1);
	($rc, $out, $err) = upgrade($plain, $new, '--link');
	isnt($rc, 0, '--link from a plaintext cluster is refused');
	like($err, qr/only --copy can upgrade it/, 'with what to do');
}

# --- encrypted 15 -> encrypted new, --copy; the old cluster still starts afterwards
{
	my ($old, $sums, $tsdir) = old_cluster('copyold', 0);
	my $new = new_cluster('copynew');
	my ($rc, $out, $err) = upgrade($old, $new, '--copy');
	is($rc, 0, 'pg_cmk upgrade --copy succeeds');
	like($out, qr/relation files verified/, 'and verifies the new cluster');
	check_new('copy', $new, $sums, $tsdir);
	$new->stop;
	$old->start;
	is_deeply(checksums($old), $sums, 'copy: the old cluster still starts and holds its rows');
	$old->stop;
	kill_switch('copy', $new);
}

# --- encrypted 15 -> encrypted new, --link
{
	my ($old, $sums, $tsdir) = old_cluster('linkold', 0);
	my $new = new_cluster('linknew');
	my ($rc, $out, $err) = upgrade($old, $new, '--link');
	is($rc, 0, 'pg_cmk upgrade --link succeeds');
	ok(-e $old->data_dir . '/global/pg_control.old' && !-e $old->data_dir . '/global/pg_control',
		'link: pg_upgrade disabled the old cluster (it shares the files)');
	my ($linked) = grep { (stat $_)[3] > 1 } glob($new->data_dir . '/base/*/*');
	ok(defined $linked, 'link: the new cluster\'s relation files are hard links');
	check_new('link', $new, $sums, $tsdir);
	kill_switch('link', $new);
}

# --- encrypted 15 -> encrypted new, --clone: both clusters and the tablespace on a
# filesystem with reflinks (XFS on a loop device, which test/run_all.sh makes as root
# and passes as CMK_TEST_REFLINK_DIR; the scratch filesystem, ext4, has none), moved
# there behind symlinks. pg_upgrade checks that cloning works before it starts.
SKIP:
{
	my $rdir = $ENV{CMK_TEST_REFLINK_DIR};
	skip 'no filesystem with reflinks here (test/run_all.sh makes one as root with mkfs.xfs and a loop device)', 14
	  unless $rdir && -d $rdir && -w $rdir;
	my ($old, $sums, $tsdir) = old_cluster('cloneold', 0);
	my $new = new_cluster('clonenew');
	for my $pair ([ $old->data_dir, 'old' ], [ $new->data_dir, 'new' ], [ $tsdir, 'ts' ])
	{
		my ($from, $to) = @$pair;
		system('mv', $from, "$rdir/$to") == 0 or die "mv $from $rdir/$to";
		symlink("$rdir/$to", $from) or die "symlink $from: $!";
	}
	my ($rc, $out, $err) = upgrade($old, $new, '--clone');
	is($rc, 0, 'pg_cmk upgrade --clone succeeds (reflinks on XFS)');
	like($out, qr/Cloning user relation files/, 'pg_upgrade cloned the relation files');
	like($out, qr/relation files verified/, 'and the new cluster is verified');
	check_new('clone', $new, $sums, $tsdir);
	$new->stop;
	$old->start;
	is_deeply(checksums($old), $sums, 'clone: the old cluster still starts and holds its rows');
	$old->stop;
}

# --- plaintext 15 -> encrypted new, --copy (the adoption path)
{
	my ($old, $sums, $tsdir) = old_cluster('plainold', 1);
	ok(scalar(scan_for_markers($old->data_dir, $marker)) > 0,
		'control: the marker is in the plaintext old cluster\'s files');
	my $new = new_cluster('plainnew');
	my ($rc, $out, $err) = upgrade($old, $new, '--copy');
	is($rc, 0, 'pg_cmk upgrade --copy from a plaintext cluster succeeds');
	like($out, qr/still plaintext on disk/, 'and says the old cluster is still plaintext');
	$new->start;
	$new->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
	$new->stop;
	check_new('plaintext', $new, $sums, $tsdir);
	kill_switch('plaintext', $new);
}

done_testing();
