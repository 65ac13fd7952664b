# Online base backups and standbys over the replication protocol with
# `pg_cmk basebackup` (issue 16, items 2, 3 and 7; docs/backups.md).
#   - plain format under pgbench load, under the source's CMK; tar format under another
#     key configuration (another CMK); both verified by pg_verifybackup through the
#     layer, both ciphertext (the marker scan finds nothing; a stock pg_basebackup of the
#     same server, the plaintext control, is found by the same scan);
#   - the plain backup plus the source's `cp` WAL archive restores to a named restore
#     point taken after the backup (the backup carries the source's WAL master key);
#     pg_amcheck is clean and pgbench's balances add up;
#   - the tar backup, unpacked, starts under its own CMK; with that CMK disabled it is
#     refused, the source unaffected;
#   - a streaming standby made with -R replays, serves reads, follows writes; a cascade
#     made from the standby follows it; the standby is promoted and the cascade follows
#     the new timeline; every data directory is ciphertext;
#   - the old primary rejoins the promoted standby, re-cloned with -R;
#   - options that would write plaintext or cannot be restored are refused.
use strict;
use warnings;

use File::Path qw(make_path);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();

my $marker = 'CMKBASEBACKUP' . int(rand(1_000_000_000));
my $store  = CmkTest::new_key_store();
my $key    = CmkTest::create_key($store);
my $key2   = CmkTest::create_key($store);

my $primary = CmkTest::new_encrypted_node(
	'primary',
	key_store        => $store,
	key_id           => $key,
	has_archiving    => 1,
	allows_streaming => 1,
	conf             => [ 'max_wal_senders = 10', 'hot_standby = on' ],
	start            => 1);
my $archive = $primary->archive_dir;
my $connstr = $primary->connstr('postgres');

$primary->safe_psql('postgres',
	"CREATE EXTENSION amcheck; CREATE TABLE t (id int PRIMARY KEY, v text);
	 INSERT INTO t SELECT g, '$marker-' || g || repeat('y', 100) FROM generate_series(1, 20000) g");
$primary->command_ok([ 'pgbench', '-i', '-s', '2', '-q', $connstr ], 'pgbench -i');

# pgbench runs for the whole backup section.
my ($pb_out, $pb_err) = ('', '');
my $pgbench = IPC::Run::start([ 'pgbench', '-n', '-c', '2', '-T', '600', $connstr ],
	'<', \undef, '>', \$pb_out, '2>', \$pb_err);

sub basebackup
{
	my ($dir, @args) = @_;
	return CmkTest::pg_cmk('basebackup', '-D', $dir, @args);
}

my $bdir = $primary->backup_dir;

# --- plain, the source's CMK, WAL streamed, under load
my ($rc, $out, $err) = basebackup("$bdir/plain", '--key-store', $store, '--key-id', $key, '--',
	'-d', $connstr, '-X', 'stream', '-c', 'fast');
is($rc, 0, 'pg_cmk basebackup (plain, WAL streamed) under pgbench load') or diag($err);
like($out, qr/pg_verifybackup passed/, 'the plain backup was verified by pg_verifybackup through the layer');
ok(-f "$bdir/plain/cmk_lakebase/keyring.json" && -f "$bdir/plain/backup_label",
	'the plain backup is a data directory with its own keyring');

# --- tar, another CMK, WAL fetched, under load
($rc, $out, $err) = basebackup("$bdir/tar", '-F', 't', '--key-store', $store, '--key-id', $key2, '--',
	'-d', $connstr, '-X', 'fetch', '-c', 'fast');
is($rc, 0, 'pg_cmk basebackup -F t (another CMK, WAL fetched) under load') or diag($err);
ok(-f "$bdir/tar/base.tar" && -f "$bdir/tar/pg_wal.tar" && -f "$bdir/tar/backup_manifest",
	'tar format: base.tar, pg_wal.tar and backup_manifest');

# --- the standby, with -R
($rc, $out, $err) = basebackup("$bdir/standby", '--key-store', $store, '--key-id', $key, '--',
	'-d', "$connstr application_name=standby", '-X', 'stream', '-c', 'fast', '-R', '-C', '-S', 'sb_slot');
is($rc, 0, 'pg_cmk basebackup -R -C -S (a standby with its own slot)') or diag($err);
ok(-f "$bdir/standby/standby.signal", '-R wrote standby.signal');
like(slurp_file("$bdir/standby/postgresql.auto.conf"), qr/primary_conninfo = '.*application_name=standby.*'\nprimary_slot_name = 'sb_slot'/,
	'-R wrote primary_conninfo and the slot into postgresql.auto.conf');

# --- the plaintext control: the stock tool, same server
$primary->command_ok([ 'pg_basebackup', '-D', "$bdir/control", '-d', $connstr, '-X', 'stream', '-c', 'fast' ],
	'stock pg_basebackup (the plaintext control)');

# pgbench's own errors (a failed transaction aborts its client) would show here.
$pgbench->signal('INT');
$pgbench->finish;
unlike($pb_err, qr/(?:ERROR|FATAL|aborted)/, 'pgbench ran through the backups without an error') or diag($pb_err);

my @control_hits = CmkTest::scan_for_markers("$bdir/control", $marker);  # list context
ok(@control_hits > 0, 'control: the marker scan finds the marker in a stock pg_basebackup copy');
is_deeply([ CmkTest::scan_for_markers("$bdir/plain", $marker) ], [], 'the plain backup holds no marker');
is_deeply([ CmkTest::scan_for_markers("$bdir/tar", $marker) ], [], 'the tar backup holds no marker');
is_deeply([ CmkTest::scan_for_markers("$bdir/standby", $marker) ], [], 'the standby copy holds no marker');

# --- history after the backups, archived with cp
$primary->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-rp-' || g FROM generate_series(20001, 21000) g");
$primary->safe_psql('postgres', "SELECT pg_create_restore_point('cmk_bb_rp')");
my $want_rp = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t');
$primary->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-late-' || g FROM generate_series(21001, 22000) g");
my $seg = $primary->safe_psql('postgres', 'SELECT pg_walfile_name(pg_switch_wal())');
$primary->poll_query_until('postgres', "SELECT last_archived_wal >= '$seg' FROM pg_stat_archiver")
  or die "segment $seg was not archived";

my $pgbench_sums = 'SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)';

# --- restore: the plain backup + the archive, to the restore point
my $r1 = PostgreSQL::Test::Cluster->new('restore_plain');
$r1->init_from_backup($primary, 'plain', has_restoring => 1, standby => 0);
$r1->append_conf('postgresql.conf',
	"archive_mode = off\nrecovery_target_name = 'cmk_bb_rp'\nrecovery_target_action = 'promote'\n");
$r1->start;
$r1->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'restore_plain did not promote';
is($r1->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'), $want_rp,
	'plain backup + the cp archive: restored to the restore point taken after the backup');
is($r1->safe_psql('postgres', $pgbench_sums), 't', 'restored: pgbench balances add up');
my $amcheck = `pg_amcheck -h @{[$r1->host]} -p @{[$r1->port]} -d postgres --heapallindexed 2>&1`;
is($?, 0, 'restored: pg_amcheck finds nothing') or diag($amcheck);
is_deeply([ CmkTest::scan_for_markers($r1->data_dir, $marker) ], [], 'restored cluster holds no marker');
$r1->stop;

# --- restore: the tar backup, unpacked, under its own CMK
make_path("$bdir/tar_x/pg_wal");
system('tar', '-xf', "$bdir/tar/base.tar", '-C', "$bdir/tar_x") == 0 or die 'tar -x base.tar';
system('tar', '-xf', "$bdir/tar/pg_wal.tar", '-C', "$bdir/tar_x/pg_wal") == 0 or die 'tar -x pg_wal.tar';
chmod 0700, "$bdir/tar_x";
my $r2 = PostgreSQL::Test::Cluster->new('restore_tar');
$r2->init_from_backup($primary, 'tar_x', standby => 0);
$r2->append_conf('postgresql.conf', "archive_mode = off\n");
$r2->start;
cmp_ok($r2->safe_psql('postgres', 'SELECT count(*) FROM t'), '>=', 20000, 'tar backup unpacked: starts, the rows are there');
is($r2->safe_psql('postgres', $pgbench_sums), 't', 'tar restore: pgbench balances add up');
($rc, $out) = CmkTest::pg_cmk('status', '-D', $r2->data_dir);
like($out, qr/\Q$key2\E/, 'the tar backup is under the other CMK');
$r2->stop;
($rc) = CmkTest::pg_cmk('key', 'disable', $key2, '--key-store', $store);
is($rc, 0, "the tar backup's CMK disabled");
my ($started, $log) = CmkTest::try_start($r2);
ok(!$started, 'the tar restore does not start with its CMK disabled');
is($primary->safe_psql('postgres', 'SELECT 1'), 1, 'the source, under its own CMK, is unaffected');
($rc) = CmkTest::pg_cmk('key', 'enable', $key2, '--key-store', $store);

# --- the standby, a cascade from it, promotion
my $sb = PostgreSQL::Test::Cluster->new('standby');
$sb->init_from_backup($primary, 'standby', has_streaming => 1);
$sb->start;
$primary->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-sb-' || g FROM generate_series(30001, 31000) g");
$primary->wait_for_catchup($sb);
is($sb->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	'the standby replays and serves reads: the same rows as the primary');

($rc, $out, $err) = basebackup($sb->backup_dir . '/casc', '--key-store', $store, '--key-id', $key, '--',
	'-d', $sb->connstr('postgres'), '-X', 'stream');
is($rc, 0, 'pg_cmk basebackup from the standby (for a cascade)') or diag($err);
my $casc = PostgreSQL::Test::Cluster->new('cascade');
$casc->init_from_backup($sb, 'casc', has_streaming => 1);
# The copy carries the standby's postgresql.auto.conf (written by -R -C -S above), which
# points at the primary's slot and overrides postgresql.conf: point it at the standby.
$casc->append_conf('postgresql.auto.conf',
	"primary_conninfo = '@{[$sb->connstr]} application_name=cascade'\nprimary_slot_name = ''\n");
$casc->start;
$primary->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-casc-' || g FROM generate_series(31001, 32000) g");
$primary->wait_for_catchup($sb);
$sb->wait_for_catchup($casc, 'replay', $primary->lsn('insert'));  # a standby has no current LSN
is($casc->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	'the cascade follows the primary through the standby');

$primary->stop;
$sb->promote;
$sb->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()') or die 'standby did not promote';
$sb->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-promoted-' || g FROM generate_series(40001, 41000) g");
$sb->wait_for_catchup($casc);
is($casc->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id > 40000'), 1000,
	'after promotion the cascade follows the new primary (new timeline)');
is($sb->safe_psql('postgres', "SELECT count(*) FROM t"), $casc->safe_psql('postgres', 'SELECT count(*) FROM t'),
	'promoted standby and cascade agree');

# --- the old primary rejoins the new one: re-cloned as its standby (pg_rewind is
# refused by the wrapper before it touches anything, 080_backup_routes.pl)
my $old_pd = $primary->data_dir;
File::Path::rmtree($old_pd);
($rc, $out, $err) = CmkTest::pg_cmk('basebackup', '-D', $old_pd, '--key-store', $store, '--key-id', $key, '--',
	'-d', $sb->connstr('postgres') . ' application_name=primary', '-X', 'stream', '-c', 'fast', '-R');
is($rc, 0, 'the old primary re-cloned from the new primary with pg_cmk basebackup -R') or diag($err);
$primary->append_conf('postgresql.conf', "port = @{[$primary->port]}\n");
# -R appended primary_conninfo, but the slot line copied from the standby's own
# postgresql.auto.conf still names the old primary's slot
$primary->append_conf('postgresql.auto.conf', "primary_slot_name = ''\n");
$primary->start;
$sb->safe_psql('postgres', "INSERT INTO t SELECT g, '$marker-rejoin-' || g FROM generate_series(50001, 50500) g");
$sb->wait_for_catchup($primary);
is($primary->safe_psql('postgres', 'SELECT pg_is_in_recovery(), count(*) FROM t WHERE id > 50000'), 't|500',
	'the old primary rejoined as a standby of the new primary and follows it');
$primary->stop;
$sb->stop;
$casc->stop;
is_deeply([ CmkTest::scan_for_markers($sb->data_dir, $marker) ], [], 'the promoted standby holds no marker');
is_deeply([ CmkTest::scan_for_markers($old_pd, $marker) ], [], 'the rejoined old primary holds no marker');
is_deeply([ CmkTest::scan_for_markers($casc->data_dir, $marker) ], [], 'the cascade holds no marker');

# --- refusals: before anything is written (against the promoted standby)
$sb->start;
$connstr = $sb->connstr('postgres');
for my $bad ([ '-z' ], [ '-Z', 'gzip' ], [ '--compress=5' ], [ '-T', '/a=/b' ], [ '--waldir=/tmp/x' ])
{
	my $dir = "$bdir/refused";
	($rc, $out, $err) = basebackup($dir, '--key-store', $store, '--key-id', $key, '--', '-d', $connstr, @$bad);
	isnt($rc, 0, "pg_cmk basebackup refuses @$bad");
	ok(!-e $dir, "... and writes nothing ($dir absent)");
}
like($err, qr/not supported/, 'the refusal says "not supported"');
($rc, $out, $err) = CmkTest::pg_cmk('exec', '-D', $sb->data_dir, '--', 'pg_basebackup', '-D', "$bdir/x");
isnt($rc, 0, 'pg_cmk exec still refuses pg_basebackup');
like($err, qr/pg_cmk basebackup/, '... and names pg_cmk basebackup instead');
$sb->stop;

done_testing();
