# Marker scan: the acceptance test of DESIGN §4's file-class table. One workload writes
# a unique random marker string through every path where PostgreSQL stores data
# (heap, TOAST, btree/hash/GIN indexes, WAL, large objects, a table rewrite, an
# unlogged table, a temp table, a sort, a hash join and a WITH HOLD cursor spilling to
# temp files, CREATE DATABASE with both strategies, a tablespace (a table and index
# created there, a table moved there, a database moved there, temp files there),
# logical decoding spill files, NOTIFY payloads in pg_notify, a prepared transaction's
# state file) and keeps the ephemeral files alive (open cursors, open transactions, a
# streaming pg_recvlogical) while every byte of every regular file under the data
# directory and the tablespace is searched for every marker; then again after a clean
# stop. Parallel query's shared temp files (parallel hash join, parallel CREATE INDEX)
# cannot be held open for a scan; they are checked by reading results back.
#
# The same workload runs on two nodes in this test:
#   - a plaintext (stock) node: the markers must be found, each in the file where its
#     path stores it (heap file, index file, pg_wal, pgsql_tmp, *.spill, pg_notify,
#     pg_twophase, the copied databases, the tablespace ...). This proves that the
#     workload really reaches every path and that the scan is able to fail.
#   - an encrypted node (CmkTest::new_encrypted_node): zero hits, while the same
#     ephemeral files are shown to exist at scan time; and every marker reads back
#     correctly through the layer (cursors, temp table, notifications, decoded
#     changes, tables, indexes, copied databases, the prepared transaction).
#
# One file past the house's ~700 lines on purpose: the scan's value is that one
# workload reaches every storage path and runs on both nodes; split, the plaintext
# control would no longer prove what the encrypted scan checks.
#
# Names are not data: relation, database, tablespace and slot names also live in
# plaintext file names and metadata files (pg_replslot/<slot>/state holds the slot
# name), so no marker is ever put into a name. The prepared transaction's GID does
# carry a marker: pg_twophase state files are encrypted.
#
# A hash index stores only hash codes, never the key, so its marker can only be found
# in the heap; the hash index path is exercised by an index scan read-back instead.
#
# The encrypted half is skipped when the product is not installed (pg_cmk or
# cmk_lakebase.so missing) or when CMK_TEST_PLAIN=1.

use strict;
use warnings;

use Digest::MD5 qw(md5_hex);
use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use CmkTest;

# Sizes: small enough for the whole test (two nodes) to stay well under 3 minutes,
# large enough that every spill really spills (work_mem, temp_buffers and
# logical_decoding_work_mem are set to their minimums or near).
my $N_ROWS     = 1000;     # heap, btree, hash, gin, tablespace tables
my $N_SORT     = 40000;    # ~4 MB through a 64 kB work_mem sort
my $N_HJ       = 20000;    # per side of the spilling hash join
my $N_HOLD     = 20000;    # WITH HOLD cursor materialized through 64 kB
my $N_TEMP     = 20000;    # ~2 MB temp table through 800 kB of temp_buffers
my $N_LOGICAL  = 5000;     # rows of the big transactions decoded with 64 kB
my $N_NOTIFY   = 100;      # NOTIFY transactions, 2 kB payload each (> 8 SLRU pages)
my $TOAST_REPS = 1700;     # (marker + md5) x 1700 = ~105 kB, stored EXTERNAL
my $WAIT_SECS  = 90;

sub random_hex { return join '', map { sprintf '%04x', int(rand(65536)) } 1 .. 4 }

# One fresh marker per kind. "gints" is a tsvector lexeme: lower case letters and
# digits only, so that the text search parser keeps it as one word.
sub new_markers
{
	my %m;
	for my $kind (
		qw(heap toast btree hash gin wal unlogged largeobject rewrite template
		tsheap tsindex tsmove temptable holdcursor sort hashjoin logical logicalpeek
		notify gid twophaserow))
	{
		$m{$kind} = "CMKMARK_${kind}_" . random_hex();
	}
	$m{gints} = 'cmkmarkgints' . random_hex();
	return \%m;
}

sub wait_for
{
	my ($what, $cond) = @_;
	my $deadline = time + $WAIT_SECS;
	while (time < $deadline)
	{
		return 1 if $cond->();
		usleep(200_000);
	}
	diag("timed out waiting for $what");
	return 0;
}

# "file: marker" lines from scan_for_markers -> [file, kind] pairs (kind 'UNREADABLE'
# for a file the scan could not read: that must never pass as "no hit").
sub classify_hits
{
	my ($markers, @hits) = @_;
	my %kind_of = reverse %$markers;
	my @out;
	for my $h (@hits)
	{
		if ($h =~ /^(.*): (\S+)$/ && exists $kind_of{$2})
		{
			push @out, [ $1, $kind_of{$2} ];
		}
		else
		{
			push @out, [ $h, 'UNREADABLE' ];
		}
	}
	return @out;
}

# Absolute path -> "PGDATA/..." or "TBLSPC/..." so expectations can be written once.
sub short_path
{
	my ($node, $file) = @_;
	my $d = $node->data_dir;
	my $t = $node->{marker_tsdir};
	return "PGDATA/$1" if $file =~ m{^\Q$d\E/(.*)$};
	return "TBLSPC/$1" if $file =~ m{^\Q$t\E/(.*)$};
	return $file;
}

# pg_relation_filepath() -> regexp on short paths (any segment or fork of it).
sub relpath_re
{
	my ($rel) = @_;
	if ($rel =~ m{^pg_tblspc/\d+/(.*)$})
	{
		return qr{^TBLSPC/\Q$1\E(?:_\w+)?(?:\.\d+)?$};
	}
	return qr{^PGDATA/\Q$rel\E(?:_\w+)?(?:\.\d+)?$};
}

sub scan_node
{
	my ($node) = @_;
	my $m = $node->{markers};
	my @hits = scan_for_markers($node->data_dir, values %$m);
	push @hits, scan_for_markers($node->{marker_tsdir}, values %$m);
	return map { [ short_path($node, $_->[0]), $_->[1] ] } classify_hits($m, @hits);
}

sub files_under
{
	my ($dir, $re) = @_;
	opendir(my $dh, $dir) or return ();
	my @f = grep { $_ !~ /^\.\.?$/ && (!$re || $_ =~ $re) } readdir $dh;
	closedir $dh;
	return map { "$dir/$_" } @f;
}

# Ephemeral files that must exist while the scan runs, or the zero-hit result of the
# encrypted node would prove nothing about them.
sub check_ephemeral_files_exist
{
	my ($node) = @_;
	my $name = $node->name;
	my $d    = $node->data_dir;
	my ($tsver) = files_under($node->{marker_tsdir}, qr/^PG_\d+_/);
	ok(scalar(grep { -s $_ } files_under("$d/base/pgsql_tmp", qr/^pgsql_tmp/)),
		"$name: sort temp files exist in base/pgsql_tmp during the scan");
	ok(defined $tsver
		  && scalar(grep { -s $_ } files_under("$tsver/pgsql_tmp", qr/^pgsql_tmp/)),
		"$name: hash join temp files exist in the tablespace's pgsql_tmp during the scan");
	my $tt = $node->{marker_temp_relpath};
	ok(-s "$d/$tt", "$name: temp table file $tt exists with data during the scan");
	ok(scalar(grep { -s $_ } files_under("$d/pg_replslot/cmk_spill", $node->{marker_spill_re})),
		"$name: the open transaction's logical decoding spill files exist during the scan");
	ok(scalar(grep { -s $_ } files_under("$d/pg_notify")),
		"$name: pg_notify has written pages during the scan");
	ok(scalar(grep { -s $_ } files_under("$d/pg_twophase")),
		"$name: pg_twophase has the prepared transaction's state file");
}

# The workload. Leaves the node running with background sessions that hold the
# ephemeral files open; returns the node. $node->{marker_*} records what the checks
# need afterwards.
sub run_workload
{
	my ($node) = @_;
	my $name = $node->name;
	my $m    = new_markers();
	$node->{markers} = $m;
	my $tsdir = PostgreSQL::Test::Utils::tempdir("ts_$name");
	$node->{marker_tsdir} = $tsdir;

	$node->append_conf(
		'postgresql.conf', q{
max_connections = 20
max_prepared_transactions = 10
logical_decoding_work_mem = 64kB
max_parallel_workers_per_gather = 0
max_parallel_maintenance_workers = 0
autovacuum = off
});
	$node->start;

	# Slots first: creating a logical slot waits for running transactions (the
	# prepared one included) to end.
	$node->safe_psql('postgres', q{
SELECT pg_create_logical_replication_slot('cmk_spill', 'test_decoding');
SELECT pg_create_logical_replication_slot('cmk_peek', 'test_decoding');
});

	# Heap, TOAST, indexes, WAL, unlogged, large object, rewrite.
	$node->safe_psql('postgres', qq{
CREATE TABLE heap_t (id int PRIMARY KEY, v text);
INSERT INTO heap_t SELECT g, '$m->{heap}:' || g FROM generate_series(1, $N_ROWS) g;

CREATE TABLE toast_t (id int PRIMARY KEY, v text);
ALTER TABLE toast_t ALTER COLUMN v SET STORAGE EXTERNAL;
INSERT INTO toast_t SELECT 1, string_agg('$m->{toast}' || md5('$m->{toast}' || g), '' ORDER BY g)
  FROM generate_series(1, $TOAST_REPS) g;

CREATE TABLE btree_t (id int, k text);
INSERT INTO btree_t SELECT g, '$m->{btree}:' || g FROM generate_series(1, $N_ROWS) g;
CREATE INDEX btree_t_k ON btree_t USING btree (k);

CREATE TABLE hash_t (id int, k text);
INSERT INTO hash_t SELECT g, '$m->{hash}:' || g FROM generate_series(1, $N_ROWS) g;
CREATE INDEX hash_t_k ON hash_t USING hash (k);

CREATE TABLE gin_t (id int, arr text[], doc tsvector);
INSERT INTO gin_t SELECT g, ARRAY['$m->{gin}', 'w' || g],
    to_tsvector('simple', '$m->{gints} word' || g)
  FROM generate_series(1, $N_ROWS) g;
CREATE INDEX gin_t_arr ON gin_t USING gin (arr);
CREATE INDEX gin_t_doc ON gin_t USING gin (doc);

CREATE TABLE wal_t (id int, v text);
INSERT INTO wal_t VALUES (1, '$m->{wal}');

CREATE UNLOGGED TABLE unlogged_t (id int PRIMARY KEY, v text);
INSERT INTO unlogged_t SELECT g, '$m->{unlogged}:' || g FROM generate_series(1, $N_ROWS) g;

CREATE TABLE lo_t (id int, lo oid);
INSERT INTO lo_t VALUES (1, lo_from_bytea(0, convert_to('$m->{largeobject}', 'UTF8')));

CREATE TABLE rewrite_t (id int, v text);
INSERT INTO rewrite_t SELECT g, '$m->{rewrite}:' || g FROM generate_series(1, $N_ROWS) g;
VACUUM FULL rewrite_t;

CREATE TABLE sort_src (id int, v text);
INSERT INTO sort_src SELECT g, '$m->{sort}:' || g FROM generate_series(1, $N_SORT) g;
CREATE TABLE hj_a (id int, v text);
CREATE TABLE hj_b (id int, v text);
INSERT INTO hj_a SELECT g, '$m->{hashjoin}:a:' || g FROM generate_series(1, $N_HJ) g;
INSERT INTO hj_b SELECT g, '$m->{hashjoin}:b:' || g FROM generate_series(1, $N_HJ) g;
CREATE TABLE hold_src (id int, v text);
INSERT INTO hold_src SELECT g, '$m->{holdcursor}:' || g FROM generate_series(1, $N_HOLD) g;
ANALYZE sort_src, hj_a, hj_b;

CREATE TABLE logical_t (id int, v text);
CREATE TABLE twophase_t (id int, v text);
});

	# A committed big transaction decoded through pg_logical_slot_peek_changes with
	# 64 kB of logical_decoding_work_mem: spills (then removes) pg_replslot/cmk_peek
	# files, and proves decoding reads the changes back intact.
	$node->safe_psql('postgres',
		"INSERT INTO logical_t SELECT g, '$m->{logicalpeek}:' || g || ':' || md5(g::text) "
		  . "FROM generate_series(1, $N_LOGICAL) g");
	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM pg_logical_slot_peek_changes('cmk_peek', NULL, NULL) "
			  . "WHERE data LIKE '%$m->{logicalpeek}:%'"),
		$N_LOGICAL,
		"$name: logical decoding (peek) returns every row of the spilled transaction");

	# Tablespace: a table and its index created there, and a table moved there.
	$node->safe_psql('postgres', qq{
CREATE TABLESPACE cmk_ts LOCATION '$tsdir';
CREATE TABLE ts_t (id int, k text, v text) TABLESPACE cmk_ts;
INSERT INTO ts_t SELECT g, '$m->{tsindex}:' || g, '$m->{tsheap}:' || g
  FROM generate_series(1, $N_ROWS) g;
CREATE INDEX ts_t_k ON ts_t (k) TABLESPACE cmk_ts;
CREATE TABLE tsmove_t (id int, v text);
INSERT INTO tsmove_t SELECT g, '$m->{tsmove}:' || g FROM generate_series(1, $N_ROWS) g;
CHECKPOINT;
ALTER TABLE tsmove_t SET TABLESPACE cmk_ts;
});

	# CREATE DATABASE, both strategies, from a template holding a marker table.
	$node->safe_psql('postgres', 'CREATE DATABASE cmk_tmpl');
	$node->safe_psql('cmk_tmpl', qq{
CREATE TABLE tmpl_t (id int PRIMARY KEY, v text);
INSERT INTO tmpl_t SELECT g, '$m->{template}:' || g FROM generate_series(1, $N_ROWS) g;
});
	$node->safe_psql('postgres', q{
CREATE DATABASE cmk_db_wal TEMPLATE cmk_tmpl STRATEGY wal_log;
CREATE DATABASE cmk_db_copy TEMPLATE cmk_tmpl STRATEGY file_copy;
CREATE DATABASE cmk_db_moved TEMPLATE cmk_tmpl STRATEGY wal_log;
ALTER DATABASE cmk_db_moved SET TABLESPACE cmk_ts;
});

	# Logical decoding spill files kept alive: pg_recvlogical streams slot cmk_spill
	# while a big transaction stays open, so the walsender's reorder buffer spills it
	# to pg_replslot/cmk_spill/*.spill and keeps the files until the commit.
	my $recv_out = PostgreSQL::Test::Utils::tempdir("recv_$name") . '/changes.out';
	$node->{marker_recv_out} = $recv_out;
	my ($rout, $rerr) = ('', '');
	$node->{marker_recv} = IPC::Run::start(
		[
			'pg_recvlogical', '-d', $node->connstr('postgres'),
			'-S', 'cmk_spill', '--start', '--no-loop', '-F', '1', '-f', $recv_out
		],
		'<', \undef, '>', \$rout, '2>', \$rerr);
	wait_for(
		'pg_recvlogical to attach to slot cmk_spill',
		sub {
			$node->safe_psql('postgres',
				"SELECT active FROM pg_replication_slots WHERE slot_name = 'cmk_spill'") eq 't';
		}) or diag("pg_recvlogical stderr: $rerr");

	# Session A: a temp table bigger than temp_buffers; a WITH HOLD cursor, whose
	# result is materialized at commit into a tuplestore that spills to a temp file
	# living across transactions; then (in one open transaction) a sorting cursor
	# and a hash-joining cursor, each fetched once so that their temp files are
	# written and stay until the transaction ends. The hash join's temp files go to
	# the tablespace (temp_tablespaces).
	my $sa = $node->background_psql('postgres', on_error_stop => 1);
	$node->{marker_sa} = $sa;
	$sa->query_safe(qq{
SET temp_buffers = '800kB';
CREATE TEMP TABLE temp_t (id int, v text);
INSERT INTO temp_t SELECT g, '$m->{temptable}:' || g || ':' || md5(g::text)
  FROM generate_series(1, $N_TEMP) g;
});
	$node->{marker_temp_relpath} = $sa->query_safe("SELECT pg_relation_filepath('temp_t')");
	$sa->query_safe(q{
SET work_mem = '64kB';
BEGIN;
DECLARE hold_c CURSOR WITH HOLD FOR SELECT id, v FROM hold_src;
COMMIT;
RESET work_mem;
});
	$sa->query_safe(q{
BEGIN;
SET LOCAL work_mem = '64kB';
SET LOCAL enable_mergejoin = off;
SET LOCAL enable_nestloop = off;
DECLARE sort_c CURSOR FOR SELECT v FROM sort_src ORDER BY md5(v);
});
	$node->{marker_sort_first} = $sa->query_safe('FETCH 1 FROM sort_c');
	$sa->query_safe(q{
SET LOCAL temp_tablespaces = 'cmk_ts';
DECLARE hj_c CURSOR FOR SELECT a.id, md5(a.v || b.v) FROM hj_a a JOIN hj_b b ON a.id = b.id;
});
	$node->{marker_hj_first} = $sa->query_safe('FETCH 1 FROM hj_c');

	# Session L: a listener inside an open transaction, so it does not consume the
	# notifications and the queue's tail stays put: the NOTIFY payloads below fill
	# more pages than the 8 SLRU buffers, which are then written to pg_notify.
	my $sl = $node->background_psql('postgres', on_error_stop => 1);
	$node->{marker_sl} = $sl;
	$sl->query_safe('LISTEN cmk_channel');
	$sl->query_safe('BEGIN; SELECT 1');
	$node->safe_psql('postgres',
		join("\n",
			map { "NOTIFY cmk_channel, '$m->{notify}:$_:" . ('n' x 2000) . "';" }
			  1 .. $N_NOTIFY));

	# Session B: the big logical transaction, left open.
	my $sb = $node->background_psql('postgres', on_error_stop => 1);
	$node->{marker_sb} = $sb;
	# The walsender decodes everything since the slot was created (the peek
	# transaction above spills too, until its commit is decoded), so wait for the
	# spill file of this very transaction: xid-<xid>-lsn-<hi>-<lo>.spill.
	$sb->query_safe(
		"BEGIN; INSERT INTO logical_t SELECT 100000 + g, '$m->{logical}:' || g || ':' || md5(g::text) "
		  . "FROM generate_series(1, $N_LOGICAL) g");
	my $xid = $sb->query_safe(
		'SELECT pg_current_xact_id()::text::bigint % 4294967296');
	$node->{marker_spill_re} = qr/^xid-$xid-lsn-[0-9A-F]+-[0-9A-F]+\.spill$/;
	wait_for(
		"spill files of transaction $xid in pg_replslot/cmk_spill",
		sub {
			scalar grep { -s $_ }
			  files_under($node->data_dir . '/pg_replslot/cmk_spill', $node->{marker_spill_re});
		});

	# A prepared transaction whose GID carries a marker; the checkpoint writes its
	# state file to pg_twophase.
	$node->safe_psql('postgres', qq{
BEGIN;
INSERT INTO twophase_t VALUES (1, '$m->{twophaserow}');
PREPARE TRANSACTION 'gid_$m->{gid}';
});
	$node->safe_psql('postgres', 'CHECKPOINT');

	# Where each marker must be found on a plaintext node: [label, kind, regexp].
	my %db_oid = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres',
		"SELECT datname, oid FROM pg_database WHERE datname LIKE 'cmk_%'");
	my $fp = sub {
		my ($db, $sql) = @_;
		return relpath_re($node->safe_psql($db, $sql));
	};
	my $rel = sub { $fp->('postgres', "SELECT pg_relation_filepath('$_[0]')") };
	$node->{marker_expect} = [
		[ 'heap',                    'heap',     $rel->('heap_t') ],
		[ 'TOAST',                   'toast',
			$fp->('postgres',
				"SELECT pg_relation_filepath(reltoastrelid) FROM pg_class WHERE relname = 'toast_t'") ],
		[ 'btree index',             'btree',    $rel->('btree_t_k') ],
		[ 'hash-indexed heap',       'hash',     $rel->('hash_t') ],
		[ 'GIN index (array)',       'gin',      $rel->('gin_t_arr') ],
		[ 'GIN index (tsvector)',    'gints',    $rel->('gin_t_doc') ],
		[ 'WAL',                     'wal',      qr{^PGDATA/pg_wal/[0-9A-F]{24}$} ],
		[ 'unlogged table',          'unlogged', $rel->('unlogged_t') ],
		[ 'large object',            'largeobject', $rel->('pg_largeobject') ],
		[ 'rewritten table',         'rewrite',  $rel->('rewrite_t') ],
		[ 'CREATE DATABASE template', 'template', qr{^PGDATA/base/$db_oid{cmk_tmpl}/\d+$} ],
		[ 'CREATE DATABASE STRATEGY wal_log', 'template',
			qr{^PGDATA/base/$db_oid{cmk_db_wal}/\d+$} ],
		[ 'CREATE DATABASE STRATEGY file_copy', 'template',
			qr{^PGDATA/base/$db_oid{cmk_db_copy}/\d+$} ],
		[ 'ALTER DATABASE SET TABLESPACE', 'template',
			qr{^TBLSPC/PG_\d+_\d+/$db_oid{cmk_db_moved}/\d+$} ],
		[ 'tablespace heap',         'tsheap',   $rel->('ts_t') ],
		[ 'tablespace index',        'tsindex',  $rel->('ts_t_k') ],
		[ 'table moved to tablespace', 'tsmove', $rel->('tsmove_t') ],
		[ 'temp table',              'temptable', relpath_re($node->{marker_temp_relpath}) ],
		[ 'sort temp file',          'sort',     qr{^PGDATA/base/pgsql_tmp/pgsql_tmp} ],
		[ 'WITH HOLD cursor temp file', 'holdcursor', qr{^PGDATA/base/pgsql_tmp/pgsql_tmp} ],
		[ 'hash join temp file (tablespace)', 'hashjoin',
			qr{^TBLSPC/PG_\d+_\d+/pgsql_tmp/pgsql_tmp} ],
		[ 'logical decoding spill file', 'logical',
			qr{^PGDATA/pg_replslot/cmk_spill/[^/]+\.spill$} ],
		[ 'NOTIFY queue (pg_notify)', 'notify',  qr{^PGDATA/pg_notify/[0-9A-F]+$} ],
		[ 'prepared transaction GID (pg_twophase)', 'gid',
			qr{^PGDATA/pg_twophase/[0-9A-F]+$} ],
	];
	return $node;
}

# query_safe() on a background session without BackgroundPsql's note() of the whole
# output: the big result sets (tens of thousands of rows, 100 x 2 kB notifications)
# would otherwise fill the test log with markers and padding.
sub quiet_query
{
	my ($session, $sql) = @_;
	no warnings 'redefine';
	local *PostgreSQL::Test::BackgroundPsql::note = sub { };
	return $session->query_safe($sql);
}

# Reads back, in the still running node, what only the background sessions can see,
# then ends them. Every check compares against values recomputed independently.
sub finish_sessions
{
	my ($node) = @_;
	my $name = $node->name;
	my $m    = $node->{markers};
	my ($sa, $sl, $sb) = @{$node}{qw(marker_sa marker_sl marker_sb)};

	# Sort: every row, in md5 order.
	my @sorted = grep { length } split /\n/,
	  $node->{marker_sort_first} . "\n" . quiet_query($sa, 'FETCH ALL FROM sort_c');
	my @md5s = map { md5_hex($_) } @sorted;
	my $in_order = 1;
	for my $i (1 .. $#md5s) { $in_order = 0, last if $md5s[ $i - 1 ] gt $md5s[$i] }
	my %seen = map { $_ => 1 } @sorted;
	my $all = !grep { !$seen{"$m->{sort}:$_"} } 1 .. $N_SORT;
	ok(@sorted == $N_SORT && $in_order && $all,
		"$name: spilled sort reads back all $N_SORT rows in order")
	  or diag('got ' . scalar(@sorted) . " rows, in_order=$in_order, all=$all");

	# Hash join: every pair, each with the right md5 of both sides.
	my @joined = grep { length } split /\n/,
	  $node->{marker_hj_first} . "\n" . quiet_query($sa, 'FETCH ALL FROM hj_c');
	my $bad = grep {
		my ($id, $h) = split /\|/;
		$h ne md5_hex("$m->{hashjoin}:a:$id$m->{hashjoin}:b:$id")
	} @joined;
	my %ids = map { (split /\|/)[0] => 1 } @joined;
	ok(@joined == $N_HJ && !$bad && keys(%ids) == $N_HJ,
		"$name: spilled hash join reads back all $N_HJ pairs")
	  or diag('got ' . scalar(@joined) . " rows, $bad wrong");
	$sa->query_safe('COMMIT');

	# WITH HOLD cursor: every row back from its tuplestore file.
	my @held = grep { length } split /\n/, quiet_query($sa, 'FETCH ALL FROM hold_c');
	my $held_bad = grep {
		my ($id, $v) = split /\|/;
		$v ne "$m->{holdcursor}:$id"
	} @held;
	my %held_ids = map { (split /\|/)[0] => 1 } @held;
	ok(@held == $N_HOLD && !$held_bad && keys(%held_ids) == $N_HOLD,
		"$name: WITH HOLD cursor reads back all $N_HOLD rows")
	  or diag('got ' . scalar(@held) . " rows, $held_bad wrong");
	$sa->query_safe('CLOSE hold_c');

	is( $sa->query_safe(
			"SELECT count(*) = $N_TEMP AND md5(string_agg(v, ',' ORDER BY id)) = "
			  . "(SELECT md5(string_agg('$m->{temptable}:' || g || ':' || md5(g::text), ',' ORDER BY g)) "
			  . "FROM generate_series(1, $N_TEMP) g) FROM temp_t"),
		't', "$name: temp table reads back");
	$sa->quit;

	# Notifications: the listener reads the whole queue (pages evicted to pg_notify
	# are read back from disk).
	# psql prints notifications after the next command's result: COMMIT's output on.
	my $notes = quiet_query($sl, 'COMMIT');
	wait_for(
		'notifications at the listener',
		sub {
			$notes .= quiet_query($sl, 'SELECT 1');
			my $n = () = $notes =~ /\Q$m->{notify}\E:\d+:n{2000}"/g;
			return $n >= $N_NOTIFY;
		});
	my %got = map { $_ => 1 } $notes =~ /\Q$m->{notify}\E:(\d+):n{2000}"/g;
	is(scalar(keys %got), $N_NOTIFY,
		"$name: the listener receives all $N_NOTIFY notification payloads intact");
	$sl->quit;

	# The open logical transaction commits: the walsender restores it from its spill
	# files and pg_recvlogical receives every row.
	$sb->query_safe('COMMIT');
	$sb->quit;
	my $re = qr/\Q$m->{logical}\E:(\d+):([0-9a-f]{32})'/;
	my $count_ok = sub {
		my $out = -e $node->{marker_recv_out} ? slurp_file($node->{marker_recv_out}) : '';
		my %ok;
		while ($out =~ /$re/g) { $ok{$1} = 1 if $2 eq md5_hex($1) }
		return scalar keys %ok;
	};
	wait_for('pg_recvlogical to receive the transaction', sub { $count_ok->() >= $N_LOGICAL });
	is($count_ok->(), $N_LOGICAL,
		"$name: logical decoding restores the spilled transaction intact ($N_LOGICAL rows)");
	$node->{marker_recv}->signal('TERM');
	eval { $node->{marker_recv}->finish; 1 };
	return;
}

# Reads back every durable marker after a restart (checks run on both nodes, so a
# failure on the plaintext node is the test's bug, on the encrypted node the product's).
sub read_back
{
	my ($node) = @_;
	my $name = $node->name;
	my $m    = $node->{markers};
	my $series = sub {
		my ($expr, $n) = @_;
		return "(SELECT md5(string_agg($expr, ',' ORDER BY g)) FROM generate_series(1, $n) g)";
	};
	my $idx = 'SET enable_seqscan = off; SET enable_bitmapscan = off; ';
	my @checks = (
		[ 'heap', 'postgres',
			"SELECT md5(string_agg(v, ',' ORDER BY id)) = "
			  . $series->("'$m->{heap}:' || g", $N_ROWS) . ' FROM heap_t' ],
		[ 'TOAST (uncompressed, external)', 'postgres',
			"SELECT pg_column_size(v) >= 100000 AND md5(v) = "
			  . "(SELECT md5(string_agg('$m->{toast}' || md5('$m->{toast}' || g), '' ORDER BY g)) "
			  . "FROM generate_series(1, $TOAST_REPS) g) FROM toast_t" ],
		[ 'btree index scan', 'postgres',
			$idx . "SELECT count(*) = 1 FROM btree_t WHERE k = '$m->{btree}:777'" ],
		[ 'btree amcheck (heapallindexed)', 'postgres',
			"CREATE EXTENSION IF NOT EXISTS amcheck; "
			  . "SELECT count(*) = 1 FROM (SELECT bt_index_check('btree_t_k', true)) s" ],
		[ 'hash index scan', 'postgres',
			$idx . "SELECT count(*) = 1 FROM hash_t WHERE k = '$m->{hash}:555'" ],
		[ 'GIN array', 'postgres',
			"SET enable_seqscan = off; SELECT count(*) = $N_ROWS FROM gin_t WHERE arr @> ARRAY['$m->{gin}']" ],
		[ 'GIN tsvector', 'postgres',
			"SET enable_seqscan = off; SELECT count(*) = $N_ROWS FROM gin_t "
			  . "WHERE doc @@ to_tsquery('simple', '$m->{gints}')" ],
		[ 'WAL row', 'postgres', "SELECT v = '$m->{wal}' FROM wal_t" ],
		[ 'unlogged table', 'postgres',
			"SELECT md5(string_agg(v, ',' ORDER BY id)) = "
			  . $series->("'$m->{unlogged}:' || g", $N_ROWS) . ' FROM unlogged_t' ],
		[ 'large object', 'postgres',
			"SELECT convert_from(lo_get(lo), 'UTF8') = '$m->{largeobject}' FROM lo_t" ],
		[ 'rewritten table', 'postgres',
			"SELECT md5(string_agg(v, ',' ORDER BY id)) = "
			  . $series->("'$m->{rewrite}:' || g", $N_ROWS) . ' FROM rewrite_t' ],
		[ 'tablespace heap', 'postgres',
			"SELECT md5(string_agg(v, ',' ORDER BY id)) = "
			  . $series->("'$m->{tsheap}:' || g", $N_ROWS) . ' FROM ts_t' ],
		[ 'tablespace index scan', 'postgres',
			$idx . "SELECT count(*) = 1 FROM ts_t WHERE k = '$m->{tsindex}:123'" ],
		[ 'table moved to tablespace', 'postgres',
			"SELECT md5(string_agg(v, ',' ORDER BY id)) = "
			  . $series->("'$m->{tsmove}:' || g", $N_ROWS) . ' FROM tsmove_t' ],
		[ 'logical rows', 'postgres',
			"SELECT count(*) = 2 * $N_LOGICAL FROM logical_t WHERE v LIKE '$m->{logical}:%' "
			  . "OR v LIKE '$m->{logicalpeek}:%'" ],
		map {
			[ "database $_", $_,
				$idx . "SELECT count(*) = 1 FROM tmpl_t WHERE id = 42 AND v = '$m->{template}:42'; "
				  . "RESET enable_seqscan; RESET enable_bitmapscan; "
				  . "SELECT md5(string_agg(v, ',' ORDER BY id)) = "
				  . $series->("'$m->{template}:' || g", $N_ROWS) . ' FROM tmpl_t' ]
		} qw(cmk_tmpl cmk_db_wal cmk_db_copy cmk_db_moved));
	for my $c (@checks)
	{
		my ($what, $db, $sql) = @$c;
		my ($rc, $out, $err) = $node->psql($db, $sql);
		my @lines = split /\n/, $out;
		ok($rc == 0 && @lines && !(grep { $_ ne 't' } @lines), "$name: read back: $what")
		  or diag("rc=$rc out=$out err=$err");
	}

	# The prepared transaction survived the restart (state file read back) and commits.
	is( $node->safe_psql('postgres', 'SELECT gid FROM pg_prepared_xacts'),
		"gid_$m->{gid}", "$name: prepared transaction with its GID after restart");
	$node->safe_psql('postgres', "COMMIT PREPARED 'gid_$m->{gid}'");
	is($node->safe_psql('postgres', 'SELECT v FROM twophase_t'),
		$m->{twophaserow}, "$name: prepared transaction's row after COMMIT PREPARED");
	return;
}

# Parallel query shares temp files between processes (SharedFileSet directories
# pgsql_tmp/pgsql_tmp<pid>.<n>.fileset/): a worker writes a batch or a sorted run under
# the per-boot key, another process reads it. These files cannot be kept open for a
# scan (cursors never run in parallel), so this checks that they read back correctly:
# a parallel hash join that spills into batches, and a parallel CREATE INDEX (its
# workers always hand their sorted runs to the leader through shared tape files; a
# parallel worker needs 32 MB of maintenance_work_mem, so nothing smaller), verified
# by trace_sort's messages and amcheck.
sub parallel_checks
{
	my ($node) = @_;
	my $name = $node->name;
	my $m    = $node->{markers};
	my $set = q{
SET max_parallel_workers_per_gather = 2;
SET max_parallel_maintenance_workers = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET enable_mergejoin = off;
SET enable_nestloop = off;
SET work_mem = '64kB';
SET maintenance_work_mem = '96MB';
};
	my $join = 'SELECT count(*), sum(hashtext(a.v || b.v)::bigint) FROM hj_a a JOIN hj_b b ON a.id = b.id';
	my $plan = $node->safe_psql('postgres',
		"$set EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) $join");
	my ($batches) = $plan =~ /Batches: (\d+)/;
	ok( $plan =~ /Parallel Hash Join/
		  && $plan =~ /Workers Launched: [12]/
		  && ($batches // 0) > 1,
		"$name: the parallel hash join runs in parallel and spills into batches")
	  or diag($plan);
	is( $node->safe_psql('postgres', "$set $join"),
		$node->safe_psql(
			'postgres',
			"SELECT count(*), sum(hashtext('$m->{hashjoin}:a:' || g || '$m->{hashjoin}:b:' || g)::bigint) "
			  . "FROM generate_series(1, $N_HJ) g"),
		"$name: parallel hash join through shared temp files returns the right rows");

	my ($rc, $out, $err) = $node->psql('postgres',
		"$set SET trace_sort = on; SET client_min_messages = log; "
		  . "CREATE INDEX sort_src_v ON sort_src (v)");
	ok( $rc == 0
		  && $err =~ /parallel external sort of worker [0-9]+ ended/
		  && $err =~ /final merge/,
		"$name: CREATE INDEX sorted in parallel workers, merged by the leader from their tapes")
	  or diag("rc=$rc\n$err");
	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM (SELECT bt_index_check('sort_src_v', true)) s; "
			  . "SET enable_seqscan = off; SET enable_bitmapscan = off; "
			  . "SELECT count(*) FROM sort_src WHERE v = '$m->{sort}:31337'"),
		"1\n1",
		"$name: index built by a parallel sort passes amcheck and finds its key");
	return;
}

sub report_hits
{
	my ($label, @hits) = @_;
	diag("$label: " . scalar(@hits) . " file/marker hits");
	diag("  $_->[0]: $_->[1]") for @hits;
	return;
}

# ---------------------------------------------------------------- plaintext node

my $plain = new_plain_node('plain', allows_streaming => 'logical');
run_workload($plain);
check_ephemeral_files_exist($plain);
my @plain_hits = scan_node($plain);
finish_sessions($plain);
$plain->stop('fast');
push @plain_hits, scan_node($plain);
report_hits('plaintext node', @plain_hits);

ok(!grep({ $_->[1] eq 'UNREADABLE' } @plain_hits), 'plain: every file was readable');
for my $e (@{ $plain->{marker_expect} })
{
	my ($label, $kind, $re) = @$e;
	ok(scalar(grep { $_->[1] eq $kind && $_->[0] =~ $re } @plain_hits),
		"plain: marker found in plaintext: $label ($kind)")
	  or diag("expected a file matching $re");
}
$plain->start;
read_back($plain);
parallel_checks($plain);
$plain->stop('fast');

# ---------------------------------------------------------------- encrypted node

SKIP:
{
	skip 'CMK_TEST_PLAIN is set: no encrypted node', 1 if is_plain_mode();
	skip 'cmk_lakebase is not installed (pg_cmk, cmk_lakebase.so)', 1
	  unless product_installed();

	my $enc = new_encrypted_node('enc', allows_streaming => 'logical');
	run_workload($enc);

	# The node really is encrypted: the module is loaded and relations report keys.
	$enc->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
	is( $enc->safe_psql(
			'postgres',
			"SELECT bool_and(cmk_lakebase.relation_is_encrypted(c)) FROM "
			  . "unnest(ARRAY['heap_t', 'btree_t_k', 'ts_t', 'unlogged_t', 'pg_class']::regclass[]) c"),
		't', 'enc: relations report encrypted');

	check_ephemeral_files_exist($enc);
	my @running = scan_node($enc);
	is(scalar(@running), 0,
		'enc: no marker in any file under the data directory or the tablespace (running, ephemeral files open)')
	  or report_hits('PRODUCT BUG: plaintext in the encrypted cluster (running)', @running);
	finish_sessions($enc);
	$enc->stop('fast');
	my @stopped = scan_node($enc);
	is(scalar(@stopped), 0,
		'enc: no marker in any file under the data directory or the tablespace (after clean stop)')
	  or report_hits('PRODUCT BUG: plaintext in the encrypted cluster (stopped)', @stopped);

	# Canary: the same scan of the same directories does report a plaintext marker
	# planted there (a file the server does not know), so zero hits above is not an
	# artefact of where or how the scan looks.
	my $canary = $enc->data_dir . '/cmk_scan_canary';
	PostgreSQL::Test::Utils::append_to_file($canary, "xx$enc->{markers}{heap}xx");
	my @canary_hits = scan_node($enc);
	unlink $canary or die "unlink $canary: $!";
	is_deeply(\@canary_hits, [ [ 'PGDATA/cmk_scan_canary', 'heap' ] ],
		'enc: the scan finds a plaintext marker planted in the encrypted data directory');
	$enc->start;
	read_back($enc);
	parallel_checks($enc);
	$enc->stop('fast');
}

done_testing();
