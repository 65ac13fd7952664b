# The WAL archive and point-in-time recovery (issue 16, item 1; docs/backups.md, "The
# WAL key scheme"). An encrypted primary archives with a plain `cp %p`, and
# `pg_cmk exec -- pg_receivewal` receives the same WAL (identical ciphertext); a base backup
# (an online copy between pg_backup_start and pg_backup_stop) plus that archive plus the
# CMK restore:
#   - to a named restore point, to a time, and to the end of the archive, across a KEK
#     rotation, a CMK rotation (key rotate + rewrap) and segment recycling in between;
#   - along a timeline switch (a restored cluster promoted onto timeline 2 archives into
#     the same archive; a second restore follows it with recovery_target_timeline);
#   - restarted afterwards (restored segments kept under their names still decrypt).
# Every archived segment is ciphertext with only its marked long page header in clear;
# the marker scan finds nothing in the archive or the backup, and finds the marker in
# a plaintext control's archive. With the CMK deleted, the restore is refused.
use strict;
use warnings;

use File::Path qw(make_path);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::RecursiveCopy;
use PostgreSQL::Test::Utils;
use Test::More;

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();

my $marker = 'CMKARCHIVEMARKER' . int(rand(1_000_000_000));
my $store  = CmkTest::new_key_store();
my $key    = CmkTest::create_key($store);

my $primary = CmkTest::new_encrypted_node(
	'primary',
	key_store        => $store,
	key_id           => $key,
	has_archiving    => 1,
	allows_streaming => 1,
	conf             => [ 'max_wal_size = 64MB', 'min_wal_size = 32MB', 'wal_keep_size = 0' ],
	start            => 1);
my $archive = $primary->archive_dir;

sub insert_rows
{
	my ($node, $from, $to, $tag) = @_;
	$node->safe_psql('postgres',
		"INSERT INTO t SELECT g, '$marker-$tag-' || g || repeat('x', 200) FROM generate_series($from, $to) g");
}

# Switches to a new segment and waits until the archiver has copied it.
sub archive_now
{
	my ($node) = @_;
	my $seg = $node->safe_psql('postgres', 'SELECT pg_walfile_name(pg_switch_wal())');
	$node->poll_query_until('postgres',
		"SELECT last_archived_wal >= '$seg' FROM pg_stat_archiver")
	  or die "segment $seg was not archived";
	return $seg;
}

$primary->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase; CREATE EXTENSION amcheck; CREATE TABLE t (id int PRIMARY KEY, v text)');
insert_rows($primary, 1, 1000, 'base');

# --- the base backup: an online copy, the key files copied last
my $pd     = $primary->data_dir;
my $backup = $primary->backup_dir . '/base';
my $bg     = $primary->background_psql('postgres');
$bg->query_safe('SET client_min_messages = warning');  # pg_backup_stop's NOTICE
$bg->query_safe("SELECT pg_backup_start('cmk_archive', true)");
PostgreSQL::Test::RecursiveCopy::copypath(
	$pd, $backup,
	filterfn => sub {
		my $src = shift;
		return $src !~ m{^(?:log|postmaster\.pid|postmaster\.opts|cmk_lakebase|pg_wal/.+)$};
	});
PostgreSQL::Test::RecursiveCopy::copypath("$pd/cmk_lakebase", "$backup/cmk_lakebase");
my $label = $bg->query_safe('SELECT labelfile FROM pg_backup_stop(true)');
$bg->quit;
open(my $lf, '>', "$backup/backup_label") or die "backup_label: $!";
print $lf $label, "\n";
close($lf);
make_path("$backup/pg_wal/archive_status");

# A physical slot from here: pg_receivewal (through the wrapper) fetches the same WAL
# the archive gets.
$primary->safe_psql('postgres', "SELECT pg_create_physical_replication_slot('recv', true)");

# --- history after the backup: a restore point, a KEK rotation, a CMK rotation, a time
insert_rows($primary, 1001, 2000, 'beforerp');
$primary->safe_psql('postgres', "SELECT pg_create_restore_point('cmk_rp1')");
insert_rows($primary, 2001, 3000, 'afterrp');
my $gen = $primary->safe_psql('postgres', 'SELECT kek_generation FROM cmk_lakebase.rotate_kek()');
ok($gen >= 2, "KEK rotated after the backup (generation $gen)");
insert_rows($primary, 3001, 4000, 'afterkek');
my ($rc) = CmkTest::pg_cmk('key', 'rotate', $key, '--key-store', $store);
is($rc, 0, 'pg_cmk key rotate: a new CMK version');
is($primary->safe_psql('postgres', 'SELECT action FROM cmk_lakebase.rewrap()'),
	'rewrap', 'the KEK re-wrapped under the new CMK version');
insert_rows($primary, 4001, 5000, 'aftercmk');
sleep 1;
my $t_target = $primary->safe_psql('postgres', 'SELECT now()');
sleep 1;
insert_rows($primary, 5001, 6000, 'aftertime');
# --- pg_receivewal through the wrapper, up to here (then the slot goes, so segments recycle)
archive_now($primary);
my $want_recv = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t');
my $recv = PostgreSQL::Test::Utils::tempdir('receivewal');
my $endpos = $primary->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
($rc) = CmkTest::pg_cmk('exec', '-D', $pd, '--', 'pg_receivewal', '-D', $recv, '--slot=recv',
	'--endpos=' . $endpos, '--no-loop', '-d', $primary->connstr('postgres'));
is($rc, 0, 'pg_cmk exec pg_receivewal received the WAL up to the end position');
$primary->safe_psql('postgres', "SELECT pg_drop_replication_slot('recv')");
# Enough segments and checkpoints that PostgreSQL recycles archived ones.
my $recycled_from = $primary->safe_psql('postgres', 'SELECT pg_walfile_name(pg_current_wal_lsn())');
for my $i (1 .. 6)
{
	insert_rows($primary, 10000 * $i, 10000 * $i + 3000, "churn$i");
	$primary->safe_psql('postgres', 'DELETE FROM t WHERE id >= 10000; CHECKPOINT');
	archive_now($primary);
}
my $last = archive_now($primary);
my $want_all = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t');
ok(!-e "$pd/pg_wal/$recycled_from", "segment $recycled_from was recycled or removed on the primary");

# --- pg_receivewal's segments are the archive's, byte for byte
my @received = sort grep { /^[0-9A-F]{24}$/ } map { s{.*/}{}r } glob("$recv/*");
ok(@received >= 2, scalar(@received) . ' complete segments received');
my $same = grep { system('cmp', '-s', "$recv/$_", "$archive/$_") == 0 } @received;
is($same, scalar(@received), 'every received segment is identical to its archived copy (same ciphertext)');
is_deeply([ CmkTest::scan_for_markers($recv, $marker) ], [], 'the pg_receivewal directory holds no marker');

# --- what the archive holds
my @segments = sort grep { /^[0-9A-F]{24}$/ } map { s{.*/}{}r } glob("$archive/*");
ok(@segments >= 8, scalar(@segments) . ' segments archived');
my $marked = 0;
for my $s (@segments)
{
	open(my $fh, '<:raw', "$archive/$s") or die "$s: $!";
	sysread($fh, my $head, 40) == 40 or die "$s: short";
	close $fh;
	# xlp_info carries the mark (0x4000); the header is otherwise PostgreSQL's own.
	my ($magic, $info, $tli) = unpack('vvV', $head);
	$marked++ if ($info & 0x4000) && ($info & 0x0002) && $tli == 1;
}
is($marked, scalar(@segments), 'every archived segment has its marked long page header in clear');
is_deeply([ CmkTest::scan_for_markers($archive, $marker) ], [], 'the archive holds no marker');
is_deeply([ CmkTest::scan_for_markers($backup, $marker) ], [], 'the base backup holds no marker');

# A restored node from the base backup, fetching WAL from the archive.
sub restore_node
{
	my ($name, @conf) = @_;
	my $n = PostgreSQL::Test::Cluster->new($name);
	$n->init_from_backup($primary, 'base', has_restoring => 1, standby => 0);
	$n->append_conf('postgresql.conf', join("\n", 'archive_mode = off', @conf) . "\n");
	return $n;
}

sub wait_promoted
{
	my ($n) = @_;
	$n->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
	  or die $n->name . ' did not finish recovery';
}

my $rows = 'SELECT count(*) FROM t';

# --- to a time after the KEK and the CMK rotation
my $tt = restore_node('restore_time', "recovery_target_time = '$t_target'", "recovery_target_action = 'promote'");
$tt->start;
wait_promoted($tt);
is($tt->safe_psql('postgres', $rows), 5000,
	'restore to a time: the rows written across the KEK and CMK rotations, none after');
$tt->stop;

# --- to the end of the archive, restarted afterwards
my $end = restore_node('restore_end');
$end->start;
wait_promoted($end);
is($end->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$want_all, 'restore to the end of the archive: the same rows as the primary');
$end->restart;
is($end->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$want_all, 'restored cluster restarted: still the same rows');
is($end->safe_psql('postgres', "SELECT bt_index_check('t_pkey', true)"), '', 'restored cluster: amcheck clean');
my $amcheck = `pg_amcheck -h @{[$end->host]} -p @{[$end->port]} -d postgres --heapallindexed 2>&1`;
is($?, 0, 'restored cluster: pg_amcheck finds nothing') or diag($amcheck);
is_deeply([ CmkTest::scan_for_markers($end->data_dir, $marker) ], [], 'restored cluster holds no marker');
$end->stop;

# --- from pg_receivewal's directory instead of the archive, to its end
my $fromrecv = restore_node('restore_recv', "restore_command = 'cp $recv/%f %p'");
$fromrecv->start;
wait_promoted($fromrecv);
is($fromrecv->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$want_recv, 'restore from the pg_receivewal directory: the rows up to its end');
$fromrecv->stop;

# --- to a named restore point; promoted there onto timeline 2, this cluster archives
# into the same archive (the timeline switch below)
my $rp = restore_node('restore_rp', "recovery_target_name = 'cmk_rp1'", "recovery_target_action = 'promote'",
	'archive_mode = on', "archive_command = 'cp %p $archive/%f'");
$rp->start;
wait_promoted($rp);
is($rp->safe_psql('postgres', $rows), 2000, 'restore to the named point: exactly the rows before it');

# --- a timeline switch: the cluster restored to cmk_rp1 (now on timeline 2) writes and
# archives into the same archive; a new restore follows it to its end.
insert_rows($rp, 7001, 7500, 'timeline2');
my $tl2 = archive_now($rp);
like($tl2, qr/^00000002/, "the promoted restore archives on timeline 2 ($tl2)");
ok(-f "$archive/00000002.history", 'timeline history file archived');
$rp->stop;
my $follow = restore_node('restore_tl2', "recovery_target_timeline = 'latest'", "recovery_target_action = 'promote'");
$follow->start;
wait_promoted($follow);
is($follow->safe_psql('postgres', $rows), 2500, 'restore along the timeline switch: rows to cmk_rp1, then timeline 2');
like($follow->safe_psql('postgres', 'SELECT v FROM t WHERE id = 7500'),
	qr/^\Q$marker\E-timeline2-7500/, 'a row written on timeline 2 is there');
$follow->stop;
is_deeply([ CmkTest::scan_for_markers($archive, $marker) ], [], 'the archive still holds no marker');

# --- plaintext control: the same scan finds the marker in a stock cluster's archive
my $control = CmkTest::new_plain_node('control', has_archiving => 1, allows_streaming => 1, start => 1);
$control->safe_psql('postgres',
	"CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, '$marker-plain' FROM generate_series(1, 100) g");
archive_now($control);
ok(scalar(my @hits = CmkTest::scan_for_markers($control->archive_dir, $marker)) > 0,
	'plaintext control: the scan finds the marker in a stock archive');
$control->stop;

# --- the kill switch reaches backups: the CMK deleted, no restore
$primary->stop;
($rc) = CmkTest::pg_cmk('key', 'delete', $key, '--key-store', $store, '--yes');
is($rc, 0, 'the CMK deleted');
my $dead = restore_node('restore_dead');
my ($started, $log) = CmkTest::try_start($dead);
ok(!$started, 'with the CMK deleted, a restore from the backup and the archive does not start');
like($log, qr/FATAL:.*cmk_lakebase/, 'it says why, in one FATAL line') or diag($log);

done_testing();
