# Files other PostgreSQL modules write under the data directory (issue 18):
# pg_stat_statements keeps statement texts, with the literals of utility statements,
# in pg_stat_tmp/pgss_query_texts.stat while the server runs (written by the module's
# own pwrite/read calls and by AllocateFile/fwrite) and in
# pg_stat/pg_stat_statements.stat across a restart (AllocateFile/fwrite at shutdown,
# fread at start). Both must be ciphertext, and the module must still work: texts
# shown, kept across a restart, garbage-collected and reset, appended to by several
# backends at once.
#
# Markers ride in utility statements whose literals pg_stat_statements keeps verbatim:
# CREATE TABLE AS with a constant, COMMENT ON, a NOTIFY payload, a PREPARE
# TRANSACTION gid, and a DO block whose literal lives nowhere but in the statement
# texts. The same steps run on
#   - a plaintext control node: the DO block's marker is found in
#     pg_stat_tmp/pgss_query_texts.stat while the server runs and in
#     pg_stat/pg_stat_statements.stat after a clean stop (so the scan can fail);
#   - an encrypted node: no marker anywhere under the data directory, at either time,
#     while those files exist; with shared_preload_libraries listing cmk_lakebase
#     first, then (restarted) pg_stat_statements first.
# Skipped on the encrypted side when the product is not installed or CMK_TEST_PLAIN=1.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

sub random_hex { return join '', map { sprintf '%04x', int(rand(65536)) } 1 .. 4 }

sub new_markers
{
	my %m;
	$m{$_} = "CMKMARK_${_}_" . random_hex() for qw(ctas comment notify gid do conc);
	return \%m;
}

sub short { my ($node, $f) = @_; my $d = $node->data_dir; $f =~ s{^\Q$d\E/}{PGDATA/}; return $f }

sub scan
{
	my ($node) = @_;
	my @hits = scan_for_markers($node->data_dir, values %{ $node->{markers} });
	return map { short($node, $_) } @hits;
}

# Statements whose texts hold the markers; several backends appending texts at once
# (pgbench, 4 clients, each statement distinct) with pg_stat_statements.max = 100, so
# that entries are evicted and the text file is garbage-collected (rewritten with
# AllocateFile, truncated through fileno) while others append.
sub workload
{
	my ($node) = @_;
	my $name = $node->name;
	my $m    = $node->{markers};
	$node->safe_psql('postgres', 'CREATE EXTENSION pg_stat_statements');

	my $pad = 'x' x 250;
	$node->pgbench(
		'--no-vacuum --client=4 --jobs=2 --transactions=150 --protocol=simple',
		0,
		[qr{processed: 600/600}],
		[qr{^$}],
		"$name: 4 clients store 600 distinct statement texts at once",
		{ '043_conc' => "\\set r random(1, 1000000000)\nDO \$\$BEGIN PERFORM '$m->{conc}_:r'; END -- $pad\n\$\$;\n" });
	my $bad = $node->safe_psql(
		'postgres', qq{SELECT count(*) FROM pg_stat_statements
		  WHERE query IS NULL OR (query LIKE '%CMKMARK_conc%'
		    AND query !~ '^DO \\\$\\\$BEGIN PERFORM ''$m->{conc}_[0-9]+''; END -- x{250}\n\\\$\\\$\$')});
	is($bad, '0', "$name: every stored text reads back whole after concurrent appends and garbage collection");
	my $n = $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%$m->{conc}%'");
	ok($n >= 50, "$name: the concurrent statements are listed ($n)");
	is($node->safe_psql('postgres', 'SELECT count(*) > 0 FROM (SELECT pg_stat_statements_reset()) r'),
		't', "$name: pg_stat_statements_reset() truncates the text file");

	$node->safe_psql('postgres', "CREATE TABLE ctas AS SELECT '$m->{ctas}'::text AS v");
	$node->safe_psql('postgres', "COMMENT ON TABLE ctas IS '$m->{comment}'");
	$node->safe_psql('postgres', "NOTIFY cmk_channel, '$m->{notify}'");
	$node->safe_psql('postgres',
		"BEGIN; CREATE TABLE tp (a int); PREPARE TRANSACTION '$m->{gid}'");
	$node->safe_psql('postgres', "COMMIT PREPARED '$m->{gid}'");
	$node->safe_psql('postgres', "DO \$\$BEGIN PERFORM '$m->{do}'; END\$\$");
	check_listed($node, 'after the statements', qw(ctas comment notify gid do));
}

sub check_listed
{
	my ($node, $when, @kinds) = @_;
	my $name = $node->name;
	for my $k (@kinds)
	{
		my $mk = $node->{markers}{$k};
		my $n = $node->safe_psql('postgres',
			"SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%$mk%'");
		ok($n >= 1, "$name: pg_stat_statements shows the $k statement $when");
	}
}

sub check_log_clean
{
	my ($node, $from, $allowed) = @_;
	my $log = slurp_file($node->logfile, $from);
	my @bad = grep { /could not (?:read|write|truncate|open|rename)|no data encryption key|decrypt/ }
	  split /\n/, $log;
	@bad = grep { !/$allowed/ } @bad if $allowed;
	is(join("\n", @bad), '', $node->name . ': no file errors in the server log');
}

sub set_preload
{
	my ($node, $libs) = @_;
	$node->append_conf('postgresql.conf', "shared_preload_libraries = '$libs'\n");
}

my $common = "max_prepared_transactions = 5\npg_stat_statements.max = 100\n"
  . "pg_stat_statements.track_utility = on\nautovacuum = off\n";

# ---- plaintext control ------------------------------------------------------------

my $plain = new_plain_node('pgss_plain', conf => $common);
set_preload($plain, 'pg_stat_statements');
$plain->{markers} = new_markers();
$plain->start;
workload($plain);
my $texts = 'PGDATA/pg_stat_tmp/pgss_query_texts.stat';
my $dump  = 'PGDATA/pg_stat/pg_stat_statements.stat';
my @hits  = scan($plain);
ok((grep { $_ eq "$texts: $plain->{markers}{do}" } @hits),
	'plaintext control: the DO marker is found in the query-text file while running')
  or diag(join("\n", @hits));
$plain->stop;
@hits = scan($plain);
ok((grep { $_ eq "$dump: $plain->{markers}{do}" } @hits),
	'plaintext control: the DO marker is found in the dump file after a clean stop')
  or diag(join("\n", @hits));
$plain->start;
check_listed($plain, 'after a restart', qw(ctas comment notify gid do));
my ($ret) = $plain->psql('postgres', "LOAD 'basic_archive'");
is($ret, 0, 'plaintext control: basic_archive loads');
$plain->stop;

SKIP:
{
	skip 'cmk_lakebase is not installed (or CMK_TEST_PLAIN=1)', 1
	  if !product_installed('pg_stat_statements') || is_plain_mode();

	# ---- encrypted: cmk_lakebase first ---------------------------------------------

	my $node = new_encrypted_node('pgss_enc', conf => $common);
	set_preload($node, 'cmk_lakebase,pg_stat_statements');
	$node->{markers} = new_markers();
	my $from = -e $node->logfile ? -s $node->logfile : 0;
	$node->start;
	workload($node);
	my $d = $node->data_dir;
	ok(-s "$d/pg_stat_tmp/pgss_query_texts.stat", 'encrypted: the query-text file exists during the scan');
	is(join("\n", scan($node)), '', 'encrypted: no marker under the data directory while running');
	$node->stop;
	ok(-s "$d/pg_stat/pg_stat_statements.stat", 'encrypted: the dump file was written at shutdown');
	is(join("\n", scan($node)), '', 'encrypted: no marker under the data directory after a clean stop');
	$node->start;
	check_listed($node, 'after a restart', qw(ctas comment notify gid do));
	ok(!-e "$d/pg_stat/pg_stat_statements.stat", 'encrypted: the dump file was read back and removed at start');

	# basic_archive would archive WAL decrypted: a library loaded after start (LOAD,
	# archive_library) goes through the layer's dlopen hook, which refuses it.
	my ($lret, $lout, $lerr) = $node->psql('postgres', "LOAD 'basic_archive'");
	isnt($lret, 0, 'encrypted: LOAD basic_archive fails');
	like($lerr, qr/could not load library .*basic_archive.*cannot be used in an encrypted cluster.*archive_command/s,
		'encrypted: ... saying why and what to use instead');
	is($node->safe_psql('postgres', 'SELECT 1'), '1', 'encrypted: the server serves on after the refused load');
	is(join("\n", scan($node)), '', 'encrypted: no marker after the restart');
	check_log_clean($node, $from, qr/refused to load|could not load library "[^"]*basic_archive/);

	# ---- encrypted: pg_stat_statements first ----------------------------------------

	set_preload($node, 'pg_stat_statements,cmk_lakebase');
	$node->restart;
	my $rev = 'CMKMARK_reverse_' . random_hex();
	$node->{markers}{reverse} = $rev;
	$node->safe_psql('postgres', "DO \$\$BEGIN PERFORM '$rev'; END\$\$");
	check_listed($node, 'with pg_stat_statements listed first', qw(reverse do));
	is(join("\n", scan($node)), '', 'encrypted, other order: no marker while running');
	$node->stop;
	ok(-s "$d/pg_stat/pg_stat_statements.stat", 'encrypted, other order: the dump file was written');
	is(join("\n", scan($node)), '', 'encrypted, other order: no marker after a clean stop');
	$node->start;
	check_listed($node, 'after a restart in the other order', qw(reverse ctas do));
	check_log_clean($node, $from, qr/refused to load|could not load library "[^"]*basic_archive/);

	# A plaintext dump left by an earlier version of cmk_lakebase: removed at start
	# (statistics lost, as after a crash) instead of refusing the start.
	$node->append_conf('postgresql.conf', "pg_stat_statements.save = off\n");
	$node->reload;
	sleep 2;    # the postmaster, which writes the dump at shutdown, rereads its settings
	$node->stop;
	ok(!-e "$d/pg_stat/pg_stat_statements.stat", 'encrypted: no dump written with pg_stat_statements.save = off');
	append_to_file("$d/pg_stat/pg_stat_statements.stat", 'a plaintext dump ' . random_hex());
	my $at = -s $node->logfile;
	$node->start;
	ok(!-e "$d/pg_stat/pg_stat_statements.stat",
		'encrypted: a plaintext dump from an earlier version is removed at start');
	like(slurp_file($node->logfile, $at),
		qr/pg_stat_statements\.stat" was written in plaintext before/, 'encrypted: the removal is logged');
	$node->stop;

	# basic_archive as archive_library: the archiver cannot load it, nothing is archived.
	my $archive = PostgreSQL::Test::Utils::tempdir('basic_archive');
	$node->append_conf('postgresql.conf',
		"wal_level = replica\narchive_mode = on\narchive_library = 'basic_archive'\nbasic_archive.archive_directory = '$archive'\n");
	$at = -s $node->logfile;
	$node->start;
	$node->safe_psql('postgres', 'CREATE TABLE walfill AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal()');
	my $seen = 0;
	for (1 .. 60)
	{
		$seen = 1, last
		  if slurp_file($node->logfile, $at) =~ /could not load library "[^"]*basic_archive[^"]*": cmk_lakebase: the module "basic_archive" cannot be used/;
		sleep 1;
	}
	ok($seen, 'encrypted: the archiver refuses to load basic_archive');
	opendir(my $ad, $archive) or die;
	is(join(' ', grep { !/^\./ } readdir $ad), '', 'encrypted: basic_archive archived nothing');
	closedir $ad;
	$node->stop;
}

done_testing();
