# What each PostgreSQL major version changed in file I/O, on the version under test
# (test/run_version.sh runs this file inside each version's root filesystem):
#
# - every call the server executable imports that moves file bytes is an entry point of
#   the layer (nm -D of postgres against the layer's exports): 17's vectored
#   preadv/pwritev, 16+'s posix_fallocate, 18's copy_file_range;
# - a table loaded by COPY (16+ extends relations in bulk: posix_fallocate or zeroed
#   pwritev) and read back after a restart by a sequential scan (17+: vectored reads of
#   up to io_combine_limit blocks) has every row and no marker on disk, where a stock
#   node of the same version shows the marker (the control);
# - CREATE DATABASE ... STRATEGY = FILE_COPY (18: with file_copy_method = clone, i.e.
#   copy_file_range) gives a readable database whose files are ciphertext;
# - 18+: io_method = io_uring is refused at start with the module's FATAL; worker (the
#   default: I/O workers are postmaster children) and sync read the data back; data
#   checksums are on.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $marker = 'CMKVERSIONMARKER' . int(rand(1e9));
my $rows   = 60000;
my $bindir = $ENV{PG_BINDIR} // '/usr/lib/postgresql/15/bin';

my $probe = PostgreSQL::Test::Cluster->new('probe');
my $major = $probe->pg_version->major;
note("PostgreSQL major version under test: $major");

# --- the executable's file calls are all the layer's
my $pkglib = `$bindir/pg_config --pkglibdir`;
chomp $pkglib;
my %imported = map { s/@.*//r => 1 }
  map { (split ' ')[-1] } split /\n/, `nm -D --undefined-only $bindir/postgres`;
my %exported = map { (split ' ')[-1] => 1 }
  grep { / T / } split /\n/, `nm -D --defined-only $pkglib/libcmk_lakebase_fs.so`;
ok(scalar(keys %imported) > 100 && scalar(keys %exported) > 10,
	'nm lists the server executable\'s imports and the layer\'s exports');
# The C library calls that move bytes of a file or change its size or identity.
my @file_calls = qw(
  open open64 openat openat64 __open_2 __open64_2 __openat_2 creat close
  read __read_chk write pread pread64 __pread_chk __pread64_chk pwrite pwrite64
  readv writev preadv preadv64 pwritev pwritev64 preadv2 pwritev2
  rename renameat renameat2 link linkat unlink unlinkat truncate ftruncate
  fallocate fallocate64 posix_fallocate posix_fallocate64 copy_file_range mmap mmap64);
my @used    = grep { $imported{$_} } @file_calls;
my @missing = grep { !$exported{$_} } @used;
note("file calls postgres $major imports: @used");
is_deeply(\@missing, [], "the layer has an entry point for every file call postgres $major imports");
if ($major >= 17)
{
	ok($imported{preadv} && $imported{pwritev},
		"postgres $major imports the vectored preadv/pwritev the layer serves");
}
if ($major >= 16)
{
	ok($imported{posix_fallocate}, "postgres $major extends relations with posix_fallocate");
}
# Calls through which data would pass unseen: a server importing one is refused at
# start by the layer (got.cpp), so none may be imported by a server we support.
my @unseen = grep { $imported{$_} }
  qw(sendfile sendfile64 splice vmsplice tee io_uring_setup io_uring_enter io_submit aio_read aio_write);
is_deeply(\@unseen, [], "postgres $major imports no call that moves file data past the layer");

# --- a stock node (control) and an encrypted node, same load
my $csv = PostgreSQL::Test::Utils::tempdir() . '/rows.csv';
open(my $fh, '>', $csv) or die "$csv: $!";
print $fh "$_,$marker row $_ " . ('x' x 200) . "\n" for 1 .. $rows;
close $fh;

sub load
{
	my ($node) = @_;
	$node->safe_psql('postgres', qq{
		CREATE DATABASE src;
	});
	$node->safe_psql('src', qq{
		CREATE TABLE t (id int PRIMARY KEY, payload text);
		ALTER TABLE t ALTER payload SET STORAGE PLAIN;
		COPY t FROM '$csv' WITH (FORMAT csv);
		CHECKPOINT;
	});
	return;
}

my $expect = $rows . '|' . ($rows * ($rows + 1) / 2);
sub check_rows
{
	my ($node, $db, $what) = @_;
	my $got = $node->safe_psql($db,
		"SET enable_indexscan = off; SET enable_bitmapscan = off; "
		  . "SELECT count(*), sum(id) FROM t WHERE payload LIKE '$marker row %'");
	is($got, $expect, "$what: every row reads back ($rows rows)");
	return;
}

my $plain = new_plain_node('plain', start => 1, conf => 'shared_buffers = 16MB');
load($plain);
$plain->stop;
my @control = scan_for_markers($plain->data_dir, $marker);
ok(scalar(@control) > 0, 'control: the stock node holds the marker in plaintext ('
	  . scalar(@control) . ' files)');

my $node = new_encrypted_node('enc', start => 1, conf => 'shared_buffers = 16MB');
load($node);
is($node->safe_psql('postgres', 'SHOW data_checksums'), 'on', 'data checksums are on');
$node->restart;    # cold buffers: the scan reads every block from disk through the layer
check_rows($node, 'src', "encrypted node, after restart");

# --- CREATE DATABASE by file copy (18: by copy_file_range, file_copy_method = clone)
my $clone_opt = '';
if ($major >= 18)
{
	$node->safe_psql('postgres', "ALTER SYSTEM SET file_copy_method = clone");
	$node->reload;
	is($node->safe_psql('postgres', 'SHOW file_copy_method'), 'clone', 'file_copy_method = clone');
}
$node->safe_psql('postgres', 'CREATE DATABASE copied TEMPLATE src STRATEGY = FILE_COPY');
$node->restart;
check_rows($node, 'copied', 'database made by file copy' . ($major >= 18 ? ' (clone)' : ''));
$node->stop;
my @hits = scan_for_markers($node->data_dir, $marker);
is_deeply(\@hits, [], 'encrypted node: no file under the data directory holds the marker');

# --- 18+: the asynchronous I/O methods
if ($major >= 18)
{
	my $ioconf = $node->data_dir . '/postgresql.conf';

	$node->append_conf('postgresql.conf', "io_method = io_uring\n");
	my ($started, $log) = try_start($node);
	ok(!$started, 'io_method = io_uring: the server does not start');
	like($log, qr/FATAL:.*cmk_lakebase: io_method = io_uring is not supported/,
		'io_method = io_uring: the module\'s FATAL says why');
	like($log, qr/io_method = worker/, 'io_method = io_uring: the hint names io_method = worker');

	$node->append_conf('postgresql.conf', "io_method = sync\n");
	$node->start;
	is($node->safe_psql('postgres', 'SHOW io_method'), 'sync', 'io_method = sync');
	check_rows($node, 'src', 'io_method = sync');
	$node->stop;

	# 19 sizes the pool between io_min_workers and io_max_workers (18: io_workers)
	$node->append_conf('postgresql.conf',
		"io_method = worker\n" . ($major >= 19 ? "io_min_workers = 2\nio_max_workers = 2\n" : "io_workers = 2\n"));
	$node->start;
	is($node->safe_psql('postgres', 'SHOW io_method'), 'worker', 'io_method = worker');
	my $workers = $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'io worker'");
	is($workers, '2', 'io_method = worker: two I/O workers run');
	check_rows($node, 'src', 'io_method = worker');
	$node->safe_psql('src', "UPDATE t SET payload = payload || ' $marker updated' WHERE id % 7 = 0; CHECKPOINT");
	$node->restart;
	is($node->safe_psql('src', "SELECT count(*) FROM t WHERE payload LIKE '% $marker updated'"),
		int($rows / 7), 'io_method = worker: rows written and read again through I/O workers');
	$node->stop;
	@hits = scan_for_markers($node->data_dir, $marker);
	is_deeply(\@hits, [], 'io_method = worker: still no marker on disk');
}

done_testing();
