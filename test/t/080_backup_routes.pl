# Backup and standby routes of an encrypted cluster (issue 16, the part that works
# today; docs/backups.md). Shown here:
#   - "pg_cmk exec" refuses the tools that would write a plaintext copy of the
#     cluster or copy files and key maps between clusters (pg_basebackup, pg_rewind,
#     pg_upgrade, and pg_receivewal asked to compress), before they run: the target
#     they were given is never created. A tool it does not refuse still runs.
#   - a streaming standby made from a file copy of the stopped primary: it replays,
#     serves reads, follows writes and is promoted; every byte of it is ciphertext
#     (marker scan), while the same scan finds the marker in a plaintext control.
#   - a streaming standby made from a file copy of the RUNNING primary, taken between
#     pg_backup_start() and pg_backup_stop() with cmk_lakebase/ copied last and rows
#     written during the copy: it starts, catches up, the rows match the primary's and
#     amcheck finds its indexes intact; its data directory is ciphertext too. A table
#     dropped while the copy runs (its files copied, its keys gone from the key map
#     copied later) does not stop the copy from starting: the file is emptied and
#     replay drops it.
#   - a data directory mixing plaintext and encrypted data files is refused at start.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Copy ();

use File::Path qw(make_path);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::RecursiveCopy;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $marker = 'CMKBACKUPMARKER' . int(rand(1_000_000_000));

my $primary = new_encrypted_node('primary', allows_streaming => 1);
# A standby made from a copy streams from the copy's start: keep that WAL around.
$primary->append_conf('postgresql.conf', "wal_keep_size = '256MB'");
$primary->start;
$primary->safe_psql('postgres', 'CREATE EXTENSION amcheck');
$primary->safe_psql('postgres', 'CREATE TABLE t (id int PRIMARY KEY, v text)');
$primary->safe_psql('postgres',
	"INSERT INTO t SELECT g, '$marker-' || g FROM generate_series(1, 2000) g");
$primary->safe_psql('postgres', 'CHECKPOINT');

# --- the wrapper refuses what it cannot do safely
my $tmp = PostgreSQL::Test::Utils::tempdir();
for my $tool (qw(pg_basebackup pg_rewind pg_upgrade))
{
	my $target = "$tmp/$tool-target";
	my ($rc, $out, $err) =
	  pg_cmk('exec', '-D', $primary->data_dir, '--', $tool, '-D', $target);
	is($rc, 1, "pg_cmk exec $tool: exit 1");
	like(
		$err,
		qr/pg_cmk exec refuses \Q$tool\E: .+ not supported on a cluster encrypted by cmk_lakebase; instead, /,
		"pg_cmk exec $tool: says why and what to do instead");
	ok(!-e $target, "pg_cmk exec $tool: the tool did not run (no $target)");
}
{
	# pg_receivewal runs (085_wal_archive), but not compressing: a compressed segment
	# would be written in plaintext.
	my $target = "$tmp/receivewal-z";
	my ($rc, $out, $err) =
	  pg_cmk('exec', '-D', $primary->data_dir, '--', 'pg_receivewal', '-D', $target, '--compress=gzip');
	is($rc, 1, 'pg_cmk exec pg_receivewal --compress: exit 1');
	like($err, qr/without compression only/, 'pg_cmk exec pg_receivewal --compress: says why');
	ok(!-e $target, 'pg_cmk exec pg_receivewal --compress: the tool did not run');
}
{
	my ($rc, $out, $err) =
	  pg_cmk('exec', '-D', $primary->data_dir, '--', 'pg_controldata', $primary->data_dir);
	is($rc, 0, 'pg_cmk exec pg_controldata: a tool that is not refused still runs');
	like($out, qr/Database cluster state:\s+in production/, 'pg_controldata read the running cluster');
}

# --- a standby from a copy of the stopped primary, streaming over TLS on loopback
# (sslmode=verify-full against a throwaway CA): the replication stream is plaintext
# inside the connection, so outside one host it must be TLS (docs/backups.md).
my $pki = PostgreSQL::Test::Utils::tempdir('pki');
system('bash', abs_path(dirname(__FILE__) . '/../kms') . '/kmip_certs.sh', $pki) == 0 or die 'certificates';
$primary->append_conf('postgresql.conf', "ssl = on\nssl_cert_file = '$pki/server.pem'\n"
	  . "ssl_key_file = '$pki/server.key'\nlisten_addresses = '127.0.0.1'\n");
$primary->append_conf('pg_hba.conf', "hostssl replication all 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 trust\n");
$primary->stop;
$primary->backup_fs_cold('cold');
$primary->start;
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'cold', has_streaming => 1);
$standby->append_conf('postgresql.conf', "primary_conninfo = 'host=127.0.0.1 port=@{[ $primary->port ]} "
	  . "sslmode=verify-full sslrootcert=$pki/ca.pem application_name=standby'\n");
$standby->start;
$primary->safe_psql('postgres',
	"INSERT INTO t SELECT g, '$marker-after-' || g FROM generate_series(2001, 2500) g");
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT count(*) FROM t'),
	'2500', 'cold-copy standby: replays and follows the primary (2500 rows)');
is($primary->safe_psql('postgres',
		"SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE r.application_name = 'standby'"),
	't', 'cold-copy standby: streams over TLS, the primary verified (verify-full)');
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'),
	't', 'cold-copy standby: is a standby');
is($standby->safe_psql('postgres', "SELECT v FROM t WHERE id = 2400"),
	"$marker-after-2400", 'cold-copy standby: serves a row written after the copy');
$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
  or die 'standby was not promoted';
$standby->safe_psql('postgres', "INSERT INTO t VALUES (9001, '$marker-promoted')");
is($standby->safe_psql('postgres', 'SELECT v FROM t WHERE id = 9001'),
	"$marker-promoted", 'cold-copy standby: promoted, it takes writes');
$standby->safe_psql('postgres', 'CHECKPOINT');

# The scan can fail: a plaintext control (a dump of the same rows) is found.
my $control = "$tmp/control";
make_path($control);
$standby->command_ok(
	[ 'pg_dump', '-d', $standby->connstr('postgres'), '-t', 't', '-f', "$control/t.sql" ],
	'plaintext control: pg_dump of the standby');
my @control_hits = CmkTest::scan_for_markers($control, $marker);
is(scalar(@control_hits), 1, 'plaintext control: the marker scan finds the marker in the dump');
is_deeply([ CmkTest::scan_for_markers($standby->data_dir, $marker) ],
	[], 'cold-copy standby: no marker anywhere in its data directory');
is_deeply([ CmkTest::scan_for_markers($primary->backup_dir . '/cold', $marker) ],
	[], 'cold copy: no marker anywhere in the copy');
$standby->stop;

# --- a standby from a copy of the running primary
my $pd     = $primary->data_dir;
my $online = $primary->backup_dir . '/online';
my $bg     = $primary->background_psql('postgres');
# pg_backup_stop's NOTICE (no WAL archiving: the standby streams it) is not an error.
$bg->query_safe('SET client_min_messages = warning');
# A table dropped while the copy runs, after its files were copied and before the key
# map was: the copy holds its files, the key map records their keys as removed.
$primary->safe_psql('postgres', "CREATE TABLE dropme AS SELECT g, '$marker-dropme' AS v FROM generate_series(1, 3000) g");
$bg->query_safe("SELECT pg_backup_start('cmk_online', true)");
# Rows written while the copy runs: replayed by the standby from the primary's WAL.
$primary->safe_psql('postgres',
	"INSERT INTO t SELECT g, '$marker-during-' || g FROM generate_series(3001, 4000) g");
PostgreSQL::Test::RecursiveCopy::copypath(
	$pd, $online,
	filterfn => sub {
		my $src = shift;
		# WAL comes from the primary by streaming; the keys are copied last.
		return $src !~ m{^(?:log|postmaster\.pid|postmaster\.opts|cmk_lakebase|pg_wal/.+)$};
	});
$primary->safe_psql('postgres',
	"INSERT INTO t SELECT g, '$marker-during-' || g FROM generate_series(4001, 4500) g");
my $dropme = $primary->safe_psql('postgres', "SELECT pg_relation_filepath('dropme')");
ok(-s "$online/$dropme", 'the copy holds the table dropped during the backup');
$primary->safe_psql('postgres', 'DROP TABLE dropme; CHECKPOINT');
PostgreSQL::Test::RecursiveCopy::copypath("$pd/cmk_lakebase", "$online/cmk_lakebase");
my $label = $bg->query_safe('SELECT labelfile FROM pg_backup_stop(true)');
$bg->quit;
ok($label =~ /^START WAL LOCATION:/m, 'pg_backup_stop returned the backup label');
open(my $lf, '>', "$online/backup_label") or die "backup_label: $!";
print $lf $label, "\n";
close($lf);
make_path("$online/pg_wal/archive_status");

my $copy = PostgreSQL::Test::Cluster->new('online_standby');
$copy->init_from_backup($primary, 'online', has_streaming => 1);
my ($copy_started, $copy_log) = CmkTest::try_start($copy);
ok($copy_started, 'online copy starts although a table was dropped while it was taken');
like($copy_log, qr/\Q$dropme\E" was dropped while the backup was taken/,
	'the dropped table\'s file is named in the log as emptied for replay') or diag($copy_log);
$primary->safe_psql('postgres', "INSERT INTO t VALUES (9500, '$marker-final')");
$primary->wait_for_catchup($copy);
my $rows = 'SELECT count(*), sum(hashtext(v)) FROM t';
is($copy->safe_psql('postgres', $rows),
	$primary->safe_psql('postgres', $rows),
	'online-copy standby: same rows as the primary, including those written during the copy');
is($copy->safe_psql('postgres', "SELECT bt_index_check('t_pkey', true)"),
	'', 'online-copy standby: amcheck finds the primary key index intact');
is($copy->safe_psql('postgres', 'SELECT v FROM t WHERE id = 9500'),
	"$marker-final", 'online-copy standby: follows writes after the copy');
$copy->stop;
is_deeply([ CmkTest::scan_for_markers($copy->data_dir, $marker) ],
	[], 'online-copy standby: no marker anywhere in its data directory');
is_deeply([ CmkTest::scan_for_markers($online, $marker) ],
	[], 'online copy: no marker anywhere in the copy');

# --- a data directory that mixes plaintext and encrypted files is refused at start
# (a plaintext copy restored over an encrypted cluster): the online copy's table file
# replaced by the same table's file from a stock cluster.
my $plain = CmkTest::new_plain_node('plain_source', start => 1);
$plain->safe_psql('postgres', "CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'plain')");
$plain->safe_psql('postgres', 'CHECKPOINT');
my $plain_file = $plain->data_dir . '/' . $plain->safe_psql('postgres', "SELECT pg_relation_filepath('t')");
my $mixed_file = $copy->data_dir . '/' . $primary->safe_psql('postgres', "SELECT pg_relation_filepath('t')");
$plain->stop;
$copy->stop;
File::Copy::copy($plain_file, $mixed_file) or die "copy $plain_file: $!";
my ($mixed_started, $mixed_log) = CmkTest::try_start($copy);
ok(!$mixed_started, 'a plaintext data file in an encrypted cluster: the server refuses to start');
like($mixed_log, qr/FATAL:.*hold plaintext/, 'it says the directory holds plaintext') or diag($mixed_log);

$primary->stop;
done_testing();
