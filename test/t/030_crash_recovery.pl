# Crash recovery of an encrypted cluster: a pgbench TPC-B load plus "ledger" clients
# that record every commit the server acknowledged, then SIGKILL of the postmaster and
# all its processes mid-load (with fsync on and small max_wal_size, so checkpoints and
# WAL segment recycling run under the load). After the restart: crash recovery ran,
# every acknowledged ledger commit is there (and no half transaction), amcheck finds
# no corruption in any heap or btree index (pgbench tables, ledger, system catalogs),
# the TPC-B balances agree, and after a clean stop pg_checksums (through pg_cmk exec)
# verifies every page.

use strict;
use warnings;

use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $ledger_clients = 2;
my $ledger_iters   = 20000;    # per client: far more than the load lasts

my $node = new_encrypted_node('crash');
$node->append_conf(
	'postgresql.conf', q{
log_statement = none
log_min_messages = info
max_wal_size = 64MB
min_wal_size = 32MB
checkpoint_timeout = 30s
});
$node->start;
my $host = $node->host;
my $port = $node->port;

$node->command_ok(
	[ 'pgbench', '-i', '-s', '10', '--quiet', '-h', $host, '-p', $port, 'postgres' ],
	'pgbench -i -s 10');
$node->safe_psql(
	'postgres', q{
	CREATE TABLE ledger (id bigserial PRIMARY KEY, client int NOT NULL,
	                     k int NOT NULL, payload text NOT NULL);
	CREATE INDEX ledger_client_k ON ledger (client, k);
	CREATE TABLE ledger_detail (ledger_id bigint PRIMARY KEY, amount int NOT NULL);
});

# A ledger client: each transaction inserts a ledger row and its detail row, and only
# after COMMIT returned does psql print "ack <id>". ON_ERROR_STOP ends the client at
# the first error (the crash), so every "ack" line is an acknowledged commit.
my $tmp = PostgreSQL::Test::Utils::tempdir();
my (@ledger, @ledger_out);
for my $c (1 .. $ledger_clients)
{
	my $script = "$tmp/ledger$c.sql";
	open(my $fh, '>', $script) or die "$script: $!";
	print $fh "\\set ON_ERROR_STOP 1\n";
	for my $k (1 .. $ledger_iters)
	{
		print $fh "BEGIN;\n"
		  . "INSERT INTO ledger (client, k, payload) VALUES ($c, $k, repeat(md5('$c/$k'), 4)) RETURNING id \\gset\n"
		  . "INSERT INTO ledger_detail VALUES (:id, $k);\n"
		  . "COMMIT;\n"
		  . "\\echo ack :id\n";
	}
	close $fh;
	my $out = "$tmp/ledger$c.out";
	push @ledger_out, $out;
	push @ledger,
	  IPC::Run::start(
		[
			'psql', '-X', '-q', '-A', '-t', '-h', $host, '-p', $port,
			'-d', 'postgres', '-f', $script
		],
		'<', \undef, '>', $out, '2>', "$out.err",
		IPC::Run::timeout(600));
}

my ($pgbench_out, $pgbench_err) = ('', '');
my $pgbench = IPC::Run::start(
	[
		'pgbench', '-n', '-c', '4', '-j', '2', '-T', '120', '-h', $host,
		'-p', $port, 'postgres'
	],
	'<', \undef, '>', \$pgbench_out, '2>', \$pgbench_err,
	IPC::Run::timeout(600));

# Let the load run, and make sure it really is running, before the crash.
sleep 5;
$node->poll_query_until('postgres',
	'SELECT (SELECT count(*) FROM ledger) >= 500 AND (SELECT count(*) FROM pgbench_history) >= 500'
) or die 'the load did not get going';
sleep 3;

my $logfile    = $node->logfile;
my $log_offset = -s $logfile;
crash_node($node);

# The clients now fail; collect them.
for my $h (@ledger, $pgbench)
{
	eval { $h->finish; 1 } or do { $h->kill_kill; };
}
print "# pgbench stdout:\n$pgbench_out\n# pgbench stderr:\n$pgbench_err\n";

my %acked;
for my $out (@ledger_out)
{
	open(my $fh, '<', $out) or die "$out: $!";
	while (<$fh>)
	{
		$acked{$1} = 1 if /^ack (\d+)$/;
	}
	close $fh;
	print "# $out.err:\n" . slurp_file("$out.err");
}
my $nacked = scalar keys %acked;
cmp_ok($nacked, '>=', 500, "ledger clients had acknowledged commits ($nacked)");
cmp_ok($nacked, '<', $ledger_clients * $ledger_iters,
	'ledger clients were cut off by the crash, not finished');

start_after_crash($node);
my $recovery_log = slurp_file($logfile, $log_offset);
like($recovery_log, qr/database system was (not properly shut down|interrupted)/,
	'the restart ran crash recovery');
like($recovery_log, qr/redo done at/, 'redo ran to completion');

# Every acknowledged commit survived, and no transaction survived by halves.
my %present = map { $_ => 1 } split /\n/,
  $node->safe_psql('postgres',
	'SELECT l.id FROM ledger l JOIN ledger_detail d ON d.ledger_id = l.id');
my @missing = grep { !$present{$_} } sort { $a <=> $b } keys %acked;
is(scalar(@missing), 0, 'every acknowledged ledger commit is present')
  or diag('missing ids: ' . join(' ', @missing[ 0 .. ($#missing < 20 ? $#missing : 19) ]));
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM ledger l FULL JOIN ledger_detail d ON d.ledger_id = l.id
		WHERE l.id IS NULL OR d.ledger_id IS NULL}),
	'0',
	'ledger and ledger_detail agree (no half transaction)');

# TPC-B invariants: each pgbench transaction adds the same delta to one account, one
# teller, one branch and one history row.
my ($naccounts, $hist, $sa, $st, $sb, $sh) = split /\|/,
  $node->safe_psql(
	'postgres', q{
	SELECT (SELECT count(*) FROM pgbench_accounts),
	       (SELECT count(*) FROM pgbench_history),
	       (SELECT sum(abalance) FROM pgbench_accounts),
	       (SELECT sum(tbalance) FROM pgbench_tellers),
	       (SELECT sum(bbalance) FROM pgbench_branches),
	       (SELECT coalesce(sum(delta), 0) FROM pgbench_history)});
is($naccounts, 1000000, 'pgbench_accounts has all its rows');
cmp_ok($hist, '>', 0, "pgbench committed transactions before the crash ($hist)");
is($sa, $sh, 'sum(abalance) = sum(history.delta)');
is($st, $sh, 'sum(tbalance) = sum(history.delta)');
is($sb, $sh, 'sum(bbalance) = sum(history.delta)');

# amcheck: heaps (with TOAST) and btree indexes of the load's tables.
$node->safe_psql('postgres', 'CREATE EXTENSION amcheck');
my @tables = qw(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history
  ledger ledger_detail);
for my $t (@tables)
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"SELECT blkno, offnum, attnum, msg FROM verify_heapam('$t', check_toast => true)");
	is($rc, 0, "verify_heapam($t) runs");
	is($out, '', "verify_heapam($t): no corruption") or diag($out);
}
my @indexes = split /\n/, $node->safe_psql(
	'postgres', q{
	SELECT c.relname FROM pg_index i
	JOIN pg_class c ON c.oid = i.indexrelid
	JOIN pg_am am ON am.oid = c.relam
	JOIN pg_class t ON t.oid = i.indrelid
	WHERE am.amname = 'btree' AND t.relnamespace = 'public'::regnamespace
	ORDER BY 1});
cmp_ok(scalar(@indexes), '>=', 6, 'btree indexes found: ' . join(', ', @indexes));
for my $i (@indexes)
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"SELECT bt_index_check('$i', heapallindexed => true)");
	is($rc, 0, "bt_index_check($i, heapallindexed)") or diag($err);
	($rc, $out, $err) = $node->psql('postgres',
		"SELECT bt_index_parent_check('$i', heapallindexed => true, rootdescend => true)");
	is($rc, 0, "bt_index_parent_check($i)") or diag($err);
}

# The whole database, system catalogs included.
$node->command_ok(
	[ 'pg_amcheck', '-h', $host, '-p', $port, '--heapallindexed', '-d', 'postgres' ],
	'pg_amcheck over the whole database finds no corruption');

# Still writable after recovery.
$node->command_ok(
	[ 'pgbench', '-n', '-c', '2', '-t', '200', '-h', $host, '-p', $port, 'postgres' ],
	'pgbench runs after recovery');

# Every page's checksum verifies after a clean stop (offline, through the layer).
$node->stop;
SKIP:
{
	skip 'plain mode: no pg_cmk', 2 if $node->{cmk_plain};
	my ($rc, $out, $err) = pg_cmk('exec', '-D', $node->data_dir, '--',
		'pg_checksums', '--check', '-D', $node->data_dir);
	is($rc, 0, 'pg_checksums --check after crash recovery: exit 0');
	like($out, qr/^Bad checksums:\s+0$/m, 'pg_checksums: no bad checksum');
}

done_testing();
