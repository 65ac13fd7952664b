# pgBackRest (Debian's pgbackrest) on an encrypted cluster (issue 16; docs/backups.md,
# "pgBackRest"): stanza-create, check, archive-push as archive_command, a full and an
# incremental backup taken under writes, restore to a named restore point and to the end
# of the archive, each restored cluster started, checked with pg_amcheck and its rows
# compared. The repository is uncompressed, so the marker scan over it is meaningful:
# it finds nothing there, and finds the marker in a plaintext control's repository.
use strict;
use warnings;

use File::Path qw(make_path);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();
plan skip_all => 'pgbackrest is not installed' unless grep { -x "$_/pgbackrest" } split(/:/, $ENV{PATH}), '/usr/bin';

my $marker = 'CMKPGBACKRESTMARKER' . int(rand(1_000_000_000));
my $base   = PostgreSQL::Test::Utils::tempdir('pgbackrest');

# A pgBackRest configuration for one node; stanza "main".
sub pbr_setup
{
	my ($node, $name) = @_;
	my $dir = "$base/$name";
	make_path("$dir/repo", "$dir/log", "$dir/lock", "$dir/spool");
	my $conf = "$dir/pgbackrest.conf";
	open(my $fh, '>', $conf) or die "$conf: $!";
	print $fh <<"EOC";
[global]
repo1-path=$dir/repo
repo1-retention-full=4
log-path=$dir/log
lock-path=$dir/lock
spool-path=$dir/spool
log-level-console=info
log-level-file=off
start-fast=y
compress-type=none
checksum-page=n

[main]
pg1-path=@{[ $node->data_dir ]}
pg1-port=@{[ $node->port ]}
pg1-socket-path=@{[ $node->host ]}
EOC
	close $fh;
	$node->append_conf('postgresql.conf',
		"archive_mode = on\narchive_command = 'pgbackrest --config=$conf --stanza=main archive-push %p'\n");
	return { conf => $conf, repo => "$dir/repo" };
}

sub pbr
{
	my ($pb, @args) = @_;
	my ($out, $err) = run_command([ 'pgbackrest', "--config=$pb->{conf}", '--stanza=main', @args ]);
	print "# pgbackrest @args\n$out\n$err\n";
	return ($? >> 8, $out . $err);
}

sub insert_rows
{
	my ($node, $from, $to, $tag) = @_;
	$node->safe_psql('postgres',
		"INSERT INTO t SELECT g, '$marker-$tag-' || g || repeat('y', 100) FROM generate_series($from, $to) g");
}

my $primary = CmkTest::new_encrypted_node('primary', allows_streaming => 1);
my $pb = pbr_setup($primary, 'enc');
$primary->start;
$primary->safe_psql('postgres',
	'CREATE EXTENSION amcheck; CREATE TABLE t (id int PRIMARY KEY, v text)');
insert_rows($primary, 1, 2000, 'full');

my ($rc, $out) = pbr($pb, 'stanza-create');
is($rc, 0, 'pgbackrest stanza-create');
($rc, $out) = pbr($pb, 'check');
is($rc, 0, 'pgbackrest check: archive-push of an encrypted segment passes its header check');
($rc, $out) = pbr($pb, '--type=full', 'backup');
is($rc, 0, 'full backup');
unlike($out, qr/WARN/, 'full backup: no warning');

# Writes, a DROP and a CREATE between the backups (files created and removed).
insert_rows($primary, 2001, 4000, 'incr');
$primary->safe_psql('postgres', 'CREATE TABLE gone AS SELECT * FROM t; DROP TABLE gone; CREATE TABLE kept AS SELECT * FROM t WHERE id % 7 = 0');
($rc, $out) = pbr($pb, '--type=incr', 'backup');
is($rc, 0, 'incremental backup');
like($out, qr/new backup label = \S+I\b/, 'it is an incremental backup');

insert_rows($primary, 4001, 5000, 'beforerp');
$primary->safe_psql('postgres', "SELECT pg_create_restore_point('cmk_pbr_rp')");
my $at_rp = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t');
insert_rows($primary, 5001, 6000, 'afterrp');
$primary->safe_psql('postgres', 'SELECT pg_switch_wal()');
my $at_end = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t');
my $kept = $primary->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM kept');
($rc, $out) = pbr($pb, 'check');  # waits until the last segment is in the archive
is($rc, 0, 'pgbackrest check after the writes');
$primary->stop;

# A node restored by pgBackRest into its own data directory.
sub restore_with
{
	my ($name, @args) = @_;
	my $n = PostgreSQL::Test::Cluster->new($name);
	my ($rrc, $rout) = pbr($pb, "--pg1-path=" . $n->data_dir, @args, 'restore');
	is($rrc, 0, "$name: pgbackrest restore @args");
	$n->append_conf('postgresql.conf',
		"port = @{[ $n->port ]}\nunix_socket_directories = '@{[ $n->host ]}'\narchive_mode = off\n");
	$n->start;
	$n->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()')
	  or die "$name did not finish recovery";
	my $amcheck = `pg_amcheck -h @{[ $n->host ]} -p @{[ $n->port ]} -d postgres --heapallindexed 2>&1`;
	is($?, 0, "$name: pg_amcheck finds nothing") or diag($amcheck);
	return $n;
}

my $rp = restore_with('pbr_rp', '--type=name', '--target=cmk_pbr_rp', '--target-action=promote');
is($rp->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$at_rp, 'restored to the named point: the rows at the point');
is_deeply([ CmkTest::scan_for_markers($rp->data_dir, $marker) ], [], 'restored cluster holds no marker');
$rp->stop;

my $end = restore_with('pbr_end');
is($end->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM t'),
	$at_end, 'restored to the end of the archive: every row');
is($end->safe_psql('postgres', 'SELECT count(*), sum(hashtext(v)) FROM kept'),
	$kept, 'a table created between the backups is there');
$end->restart;
is($end->safe_psql('postgres', 'SELECT count(*) FROM t'), 6000, 'restored cluster restarts');
$end->stop;

is_deeply([ CmkTest::scan_for_markers($pb->{repo}, $marker) ], [], 'the pgBackRest repository holds no marker');

# Plaintext control: the same scan finds the marker in a stock cluster's repository.
my $control = CmkTest::new_plain_node('control', allows_streaming => 1);
my $pbc = pbr_setup($control, 'plain');
$control->start;
$control->safe_psql('postgres',
	"CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, '$marker-plain' FROM generate_series(1, 100) g");
is((pbr($pbc, 'stanza-create'))[0], 0, 'control: stanza-create');
is((pbr($pbc, '--type=full', 'backup'))[0], 0, 'control: full backup');
ok(scalar(my @hits = CmkTest::scan_for_markers($pbc->{repo}, $marker)) > 0,
	'plaintext control: the scan finds the marker in a stock repository');
$control->stop;

done_testing();
