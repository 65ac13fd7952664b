# Incremental backups (PostgreSQL 17+; issue 17, item 2; docs/backups.md):
#   - `pg_cmk basebackup -- --incremental=PRIOR/backup_manifest` takes a full backup and
#     a chain of two incremental ones of an encrypted cluster under writes (updates,
#     inserts, deletes, a table created and one dropped); the incremental backups hold
#     INCREMENTAL.* files, which are ciphertext (their header's magic number is not on
#     disk, the marker scan finds nothing), while the same incremental backup taken by
#     the stock pg_basebackup, the plaintext control, shows both;
#   - the stock pg_combinebackup cannot read the encrypted chain (so the test would see
#     a route that silently read ciphertext);
#   - `pg_cmk combinebackup` reconstructs a full backup from the chain under another
#     CMK, verified by pg_verifybackup through the layer; it holds no INCREMENTAL file
#     and no marker; restored, it has exactly the rows the source had at the end of
#     the last incremental backup, pg_amcheck is clean; with its CMK disabled it does
#     not start, re-enabled it does;
#   - refused: --link, --clone, --copy-file-range, a plaintext input, a broken chain
#     (nothing left behind); on 15 (no pg_combinebackup) a clear refusal.
use strict;
use warnings;

use File::Find;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();

my $marker = 'CMKINCREMENTAL' . int(rand(1_000_000_000));
my $store  = CmkTest::new_key_store();
my $key    = CmkTest::create_key($store);
my $key2   = CmkTest::create_key($store);

my $probe = PostgreSQL::Test::Cluster->new('probe');
my $major = $probe->pg_version->major;
my $tmp   = PostgreSQL::Test::Utils::tempdir;

if ($major < 17)
{
	mkdir "$tmp/in" or die "mkdir: $!";
	my ($rc, $out, $err) = CmkTest::pg_cmk('combinebackup', '-o', "$tmp/out", '--key-store', $store,
		'--key-id', $key, "$tmp/in");
	isnt($rc, 0, "PostgreSQL $major: pg_cmk combinebackup is refused");
	like($err, qr/pg_combinebackup not found .*PostgreSQL 17 or later/,
		'... saying that incremental backups need PostgreSQL 17');
	ok(!-e "$tmp/out", '... and writes nothing');
	done_testing();
	exit 0;
}

my $primary = CmkTest::new_encrypted_node(
	'primary',
	key_store        => $store,
	key_id           => $key,
	allows_streaming => 1,
	conf             => [ 'summarize_wal = on', 'max_wal_senders = 10' ],
	start            => 1);
my $connstr = $primary->connstr('postgres');
my $bdir    = $primary->backup_dir;

$primary->safe_psql('postgres',
	"CREATE EXTENSION IF NOT EXISTS amcheck;
	 CREATE TABLE t (id int PRIMARY KEY, v text);
	 INSERT INTO t SELECT g, '$marker-' || g || repeat('x', 200) FROM generate_series(1, 30000) g;
	 CREATE TABLE doomed AS SELECT g AS id, '$marker-doomed-' || g AS v FROM generate_series(1, 2000) g;
	 CHECKPOINT");

sub basebackup
{
	my ($dir, @args) = @_;
	return CmkTest::pg_cmk('basebackup', '-D', $dir, '--key-store', $store, '--key-id', $key, '--',
		'-d', $connstr, '-X', 'stream', '-c', 'fast', @args);
}

sub incremental_files
{
	my ($dir) = @_;
	my @files;
	File::Find::find(sub { push @files, $File::Find::name if -f $_ && /^INCREMENTAL\./ }, $dir);
	my @sorted = sort @files;
	return wantarray ? @sorted : scalar @sorted;
}

sub first_u32
{
	my ($file) = @_;
	open(my $fh, '<:raw', $file) or die "open $file: $!";
	my $n = sysread($fh, my $buf, 4);
	close $fh;
	return $n == 4 ? unpack('V', $buf) : -1;
}
my $magic = 0xd3ae1f0d;    # INCREMENTAL_MAGIC of PostgreSQL 17+

# --- the full backup, then writes, then the first incremental one
my ($rc, $out, $err) = basebackup("$bdir/full");
is($rc, 0, 'full backup (pg_cmk basebackup)') or diag($err);

$primary->safe_psql('postgres',
	"UPDATE t SET v = v || '-u1' WHERE id % 10 = 0;
	 INSERT INTO t SELECT g, '$marker-i1-' || g FROM generate_series(30001, 35000) g;
	 CREATE TABLE fresh AS SELECT g AS id, '$marker-fresh-' || g AS v FROM generate_series(1, 3000) g");

($rc, $out, $err) = basebackup("$bdir/incr1", "--incremental=$bdir/full/backup_manifest");
is($rc, 0, 'first incremental backup (--incremental=full/backup_manifest)') or diag($err);
like($out, qr/pg_verifybackup passed/, 'the incremental backup was verified through the layer');
my @inc = incremental_files("$bdir/incr1");
cmp_ok(scalar(@inc), '>', 10, 'the incremental backup holds INCREMENTAL.* files (' . scalar(@inc) . ')');
is(scalar(grep { first_u32($_) == $magic } @inc), 0,
	'none of them shows the INCREMENTAL magic number on disk (their headers are ciphertext)');

# --- the plaintext control: the stock pg_basebackup, same server, same prior manifest
my $ctl = "$bdir/control_incr";
my ($ctl_out, $ctl_err) = ('', '');
IPC::Run::run([ 'pg_basebackup', '-D', $ctl, '-d', $connstr, '-X', 'stream', '-c', 'fast',
	  "--incremental=$bdir/full/backup_manifest" ], '<', \undef, '>', \$ctl_out, '2>', \$ctl_err);
is($?, 0, 'control: the stock pg_basebackup takes the same incremental backup') or diag($ctl_err);
my @ctl_inc = incremental_files($ctl);
ok(scalar(grep { first_u32($_) == $magic } @ctl_inc) > 0,
	'control: the stock pg_basebackup writes INCREMENTAL files with the magic in clear');
ok(scalar(CmkTest::scan_for_markers($ctl, $marker)) > 0, 'control: the marker scan finds the marker in it');

# --- more writes, the second incremental backup (on the first)
$primary->safe_psql('postgres',
	"DELETE FROM t WHERE id % 7 = 0;
	 DROP TABLE doomed;
	 UPDATE fresh SET v = v || '-u2' WHERE id <= 100;
	 CREATE TABLE later (id int, v text);
	 INSERT INTO later SELECT g, '$marker-later-' || g FROM generate_series(1, 500) g");
($rc, $out, $err) = basebackup("$bdir/incr2", "--incremental=$bdir/incr1/backup_manifest");
is($rc, 0, 'second incremental backup (on the first)') or diag($err);
cmp_ok(scalar(incremental_files("$bdir/incr2")), '>', 10, 'it holds INCREMENTAL.* files too');

# Nothing is written from here on: the chain's end is the source's state now.
my $sums = q{SELECT (SELECT count(*) || '/' || sum(hashtext(v)) FROM t) || ' ' ||
	(SELECT count(*) || '/' || sum(hashtext(v)) FROM fresh) || ' ' ||
	(SELECT count(*) || '/' || sum(hashtext(v)) FROM later) || ' ' ||
	(SELECT count(*) FROM pg_class WHERE relname = 'doomed')};
my $want = $primary->safe_psql('postgres', $sums);

for my $b (qw(full incr1 incr2))
{
	is_deeply([ CmkTest::scan_for_markers("$bdir/$b", $marker) ], [], "backup $b holds no marker");
}

# --- the stock pg_combinebackup cannot make sense of the encrypted chain
my ($stock_ok, $stock_out, $stock_err) = ('', '', '');
IPC::Run::run([ 'pg_combinebackup', '-o', "$tmp/stock", "$bdir/full", "$bdir/incr1", "$bdir/incr2" ],
	'<', \undef, '>', \$stock_out, '2>', \$stock_err);
isnt($?, 0, 'the stock pg_combinebackup fails on the encrypted chain (it reads ciphertext)')
  or diag($stock_err);

# --- refusals
for my $bad ([ '--link' ], [ '-k' ], [ '--clone' ], [ '--copy-file-range' ])
{
	($rc, $out, $err) = CmkTest::pg_cmk('combinebackup', '-o', "$tmp/refused", '--key-store', $store,
		'--key-id', $key2, "$bdir/full", "$bdir/incr1", '--', @$bad);
	isnt($rc, 0, "combinebackup -- @$bad is refused");
	like($err, qr/not supported/, '... as not supported');
	ok(!-e "$tmp/refused", '... and writes nothing');
}
($rc, $out, $err) = CmkTest::pg_cmk('combinebackup', '-o', "$tmp/refused", '--key-store', $store,
	'--key-id', $key2, "$bdir/full", $ctl);
isnt($rc, 0, 'a plaintext input (the stock incremental backup) is refused');
like($err, qr/not a backup made by pg_cmk basebackup/, '... by name');
ok(!-e "$tmp/refused", '... and nothing is written');
($rc, $out, $err) = CmkTest::pg_cmk('combinebackup', '-o', "$tmp/refused", '--key-store', $store,
	'--key-id', $key2, "$bdir/full", "$bdir/incr2");
isnt($rc, 0, 'a broken chain (the middle backup left out) fails in pg_combinebackup');
ok(!-e "$tmp/refused", '... and leaves no output behind');

# --- the chain combined, under another CMK
($rc, $out, $err) = CmkTest::pg_cmk('combinebackup', '-o', "$bdir/combined", '--key-store', $store,
	'--key-id', $key2, "$bdir/full", "$bdir/incr1", "$bdir/incr2");
is($rc, 0, 'pg_cmk combinebackup full incr1 incr2') or diag($err);
like($out, qr/pg_verifybackup passed/, 'the combined backup was verified through the layer');
is(scalar(incremental_files("$bdir/combined")), 0, 'the combined backup holds no INCREMENTAL file');
is_deeply([ CmkTest::scan_for_markers("$bdir/combined", $marker) ], [], 'the combined backup holds no marker');
($rc, $out) = CmkTest::pg_cmk('status', '-D', "$bdir/combined");
like($out, qr/\Q$key2\E/, 'the combined backup is under the CMK given to combinebackup');

# --- restored
my $r = PostgreSQL::Test::Cluster->new('restored');
$r->init_from_backup($primary, 'combined', standby => 0);
$r->append_conf('postgresql.conf', "archive_mode = off\nsummarize_wal = off\n");
$r->start;
is($r->safe_psql('postgres', $sums), $want, 'restored: exactly the rows the source had at the end of the chain');
my $amcheck = `pg_amcheck -h @{[$r->host]} -p @{[$r->port]} -d postgres --heapallindexed 2>&1`;
is($?, 0, 'restored: pg_amcheck finds nothing') or diag($amcheck);
$r->safe_psql('postgres', "INSERT INTO t VALUES (-1, '$marker-after')");
$r->safe_psql('postgres', 'CHECKPOINT');
is_deeply([ CmkTest::scan_for_markers($r->data_dir, $marker) ], [], 'restored and written to: still no marker');
$r->stop;

($rc) = CmkTest::pg_cmk('key', 'disable', $key2, '--key-store', $store);
is($rc, 0, "the combined backup's CMK disabled");
my ($started) = CmkTest::try_start($r);
ok(!$started, 'the restored cluster does not start with its CMK disabled');
($rc) = CmkTest::pg_cmk('key', 'enable', $key2, '--key-store', $store);
$r->start;
is($r->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id = -1'), 1, 'CMK enabled again: it starts, nothing lost');
$r->stop;

$primary->stop;
done_testing();
