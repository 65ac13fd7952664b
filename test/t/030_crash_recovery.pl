# Crash recovery of an encrypted cluster, twice over: a pgbench TPC-B load plus
# "ledger" clients that record every commit the server acknowledged, then SIGKILL of
# the postmaster and all its processes mid-load (fsync on, small max_wal_size, so
# checkpoints and WAL segment recycling run under the load and a crash can land in the
# middle of a checkpoint). After each restart: crash recovery ran, every acknowledged
# ledger commit (of every cycle) is there and no transaction survived by halves, the
# TPC-B balances agree, amcheck finds no corruption in any heap or btree index. At the
# end pg_amcheck checks the whole database (catalogs included), the cluster still
# takes writes, and after a clean stop pg_checksums (through pg_cmk exec) verifies
# every page.

use strict;
use warnings;

use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $cycles         = 2;
my $ledger_clients = 2;
my $ledger_iters   = 20000;    # per client: far more than the load lasts

my $node = new_encrypted_node(
	'crash',
	start => 1,
	conf  => q{
log_statement = none
max_wal_size = 64MB
min_wal_size = 32MB
checkpoint_timeout = 30s
});
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
	CREATE EXTENSION amcheck;
});

my $tmp = PostgreSQL::Test::Utils::tempdir();
my %acked;    # every acknowledged ledger id, all cycles

# Starts the load, waits until it is well under way, crashes the server, collects the
# clients. Returns the number of commits the ledger clients saw acknowledged.
sub load_and_crash
{
	my ($cycle) = @_;
	my (@clients, @outs);

	# A ledger client: each transaction inserts a ledger row and its detail row, and
	# only after COMMIT returned does psql print "ack <id>". ON_ERROR_STOP ends the
	# client at the first error (the crash), so every "ack" line is an acknowledged
	# commit.
	for my $c (1 .. $ledger_clients)
	{
		my $client = $cycle * 100 + $c;
		my $script = "$tmp/ledger$client.sql";
		open(my $fh, '>', $script) or die "$script: $!";
		print $fh "\\set ON_ERROR_STOP 1\n";
		for my $k (1 .. $ledger_iters)
		{
			print $fh "BEGIN;\n"
			  . "INSERT INTO ledger (client, k, payload) VALUES ($client, $k, repeat(md5('$client/$k'), 4)) RETURNING id \\gset\n"
			  . "INSERT INTO ledger_detail VALUES (:id, $k);\n"
			  . "COMMIT;\n"
			  . "\\echo ack :id\n";
		}
		close $fh;
		my $out = "$tmp/ledger$client.out";
		push @outs, $out;
		push @clients,
		  IPC::Run::start(
			[
				'psql', '-X', '-q', '-A', '-t', '-h', $host, '-p', $port,
				'-d', 'postgres', '-f', $script
			],
			'<', \undef, '>', $out, '2>', "$out.err",
			IPC::Run::timeout(600));
	}

	my ($pgbench_out, $pgbench_err) = ('', '');
	push @clients,
	  IPC::Run::start(
		[
			'pgbench', '-n', '-c', '4', '-j', '2', '-T', '120', '-h', $host,
			'-p', $port, 'postgres'
		],
		'<', \undef, '>', \$pgbench_out, '2>', \$pgbench_err,
		IPC::Run::timeout(600));

	# Let the load run, and make sure it really is running, before the crash.
	my ($l0, $h0) = split /\|/, $node->safe_psql('postgres',
		'SELECT (SELECT count(*) FROM ledger), (SELECT count(*) FROM pgbench_history)');
	sleep 5;
	$node->poll_query_until('postgres',
		"SELECT (SELECT count(*) FROM ledger) >= $l0 + 500 AND "
		  . "(SELECT count(*) FROM pgbench_history) >= $h0 + 500")
	  or die "cycle $cycle: the load did not get going";
	select(undef, undef, undef, 1 + rand(4));

	crash_node($node);

	# The clients now fail; collect them.
	for my $h (@clients)
	{
		eval { $h->finish; 1 } or $h->kill_kill;
	}
	print "# pgbench stdout:\n$pgbench_out\n# pgbench stderr:\n$pgbench_err\n";

	my $n = 0;
	for my $out (@outs)
	{
		open(my $fh, '<', $out) or die "$out: $!";
		while (<$fh>)
		{
			if (/^ack (\d+)$/) { $acked{$1} = 1; $n++; }
		}
		close $fh;
		print "# $out.err:\n" . slurp_file("$out.err");
	}
	return $n;
}

# Which read path the server takes: after a scan of a table that is not in shared
# buffers, the scanning backend has the table's segment mapped exactly when mapped
# reads are on (CMK_LAKEBASE_MAP_READS=on; off by default). The backend reads its own
# /proc/self/maps: server processes are not dumpable, so no other process of the
# postgres user may. Undef where the backend does not read its own pages (I/O workers
# on 18 and later, unless io_method = sync).
sub reads_through_mapping
{
	my $io = $node->safe_psql('postgres', q{SELECT coalesce(current_setting('io_method', true), 'sync')});
	return undef if $io ne 'sync';
	my $seg = $node->safe_psql('postgres', q{SELECT pg_relation_filepath('pgbench_accounts')});
	my $maps = $node->safe_psql(
		'postgres', q{
		SET max_parallel_workers_per_gather = 0;
		SELECT count(*) FROM pgbench_accounts;
		SELECT pg_read_file('/proc/self/maps')});
	return $maps =~ m{/\Q$seg\E(\.\d+)?$}m ? 1 : 0;
}
# After a restart, shared buffers are empty: the scan reads every page from the OS.
$node->restart;
SKIP:
{
	my $m = $node->{cmk_plain} ? undef : reads_through_mapping();
	skip 'plain mode, or pages read by I/O workers', 1 if !defined $m;
	is($m, 0, 'by default relation pages are read with pread, not through a mapping');
}

for my $cycle (1 .. $cycles)
{
	my $logfile    = $node->logfile;
	my $log_offset = -s $logfile;

	my $n = load_and_crash($cycle);
	cmp_ok($n, '>=', 500, "cycle $cycle: ledger clients had acknowledged commits ($n)");
	cmp_ok($n, '<', $ledger_clients * $ledger_iters,
		"cycle $cycle: ledger clients were cut off by the crash, not finished");

	# Cycle 1 reads relation pages with pread (the default); the restart after it
	# turns mapped reads on (CMK_LAKEBASE_MAP_READS=on), so cycle 2's load, its crash
	# and its recovery read through mappings of the segments.
	$ENV{CMK_LAKEBASE_MAP_READS} = 'on' if $cycle == 1;
	start_after_crash($node);
	# From the new server's first line on (dying backends of the crashed server may
	# still have logged "terminating connection due to unexpected postmaster exit").
	my $log = slurp_file($logfile, $log_offset);
	$log =~ s/\A.*?(?=^\S+ \S+ \S+ \[\d+\] LOG:  starting PostgreSQL)//ms;
	like($log, qr/database system was (not properly shut down|interrupted)/,
		"cycle $cycle: the restart ran crash recovery");
	like($log, qr/redo done at/, "cycle $cycle: redo ran to completion");
	unlike($log, qr/\b(PANIC|FATAL):/, "cycle $cycle: no PANIC or FATAL in recovery");

	SKIP:
	{
		my $m = $node->{cmk_plain} ? undef : reads_through_mapping();
		skip 'plain mode, or pages read by I/O workers', 1 if !defined $m;
		is($m, 1, "cycle $cycle: the restarted server reads through mappings (turned on)");
	}

	# Every acknowledged commit survived, and no transaction survived by halves.
	my %present = map { $_ => 1 } split /\n/,
	  $node->safe_psql('postgres',
		'SELECT l.id FROM ledger l JOIN ledger_detail d ON d.ledger_id = l.id');
	my @missing = grep { !$present{$_} } sort { $a <=> $b } keys %acked;
	is(scalar(@missing), 0,
		"cycle $cycle: every acknowledged ledger commit is present ("
		  . scalar(keys %acked) . ' so far)')
	  or diag('missing ids: ' . join(' ', @missing[ 0 .. ($#missing < 20 ? $#missing : 19) ]));
	is( $node->safe_psql(
			'postgres', q{
			SELECT count(*) FROM ledger l FULL JOIN ledger_detail d ON d.ledger_id = l.id
			WHERE l.id IS NULL OR d.ledger_id IS NULL}),
		'0',
		"cycle $cycle: ledger and ledger_detail agree (no half transaction)");
	is( $node->safe_psql(
			'postgres', q{
			SELECT count(*) FROM ledger
			WHERE payload <> repeat(md5(client || '/' || k), 4)}),
		'0',
		"cycle $cycle: every ledger row reads back exactly as written");

	# TPC-B invariants: each pgbench transaction adds the same delta to one account,
	# one teller, one branch and one history row.
	my ($naccounts, $hist, $sa, $st, $sb, $sh) = split /\|/,
	  $node->safe_psql(
		'postgres', q{
		SELECT (SELECT count(*) FROM pgbench_accounts),
		       (SELECT count(*) FROM pgbench_history),
		       (SELECT sum(abalance) FROM pgbench_accounts),
		       (SELECT sum(tbalance) FROM pgbench_tellers),
		       (SELECT sum(bbalance) FROM pgbench_branches),
		       (SELECT coalesce(sum(delta), 0) FROM pgbench_history)});
	is($naccounts, 1000000, "cycle $cycle: pgbench_accounts has all its rows");
	cmp_ok($hist, '>', 0, "cycle $cycle: pgbench transactions survived ($hist)");
	is($sa, $sh, "cycle $cycle: sum(abalance) = sum(history.delta)");
	is($st, $sh, "cycle $cycle: sum(tbalance) = sum(history.delta)");
	is($sb, $sh, "cycle $cycle: sum(bbalance) = sum(history.delta)");

	# amcheck: heaps (with TOAST) and btree indexes of the load's tables.
	for my $t (
		qw(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history
		ledger ledger_detail))
	{
		my ($rc, $out, $err) = $node->psql('postgres',
			"SELECT blkno, offnum, attnum, msg FROM verify_heapam('$t', check_toast => true)");
		is($rc . $out, '0', "cycle $cycle: verify_heapam($t) finds no corruption")
		  or diag($out . $err);
	}
	my @indexes = split /\n/, $node->safe_psql(
		'postgres', q{
		SELECT c.relname FROM pg_index i
		JOIN pg_class c ON c.oid = i.indexrelid
		JOIN pg_am am ON am.oid = c.relam
		JOIN pg_class t ON t.oid = i.indrelid
		WHERE am.amname = 'btree' AND t.relnamespace = 'public'::regnamespace
		ORDER BY 1});
	is(scalar(@indexes), 6, "cycle $cycle: btree indexes: " . join(', ', @indexes));
	for my $i (@indexes)
	{
		my ($rc, $out, $err) = $node->psql('postgres',
			"SELECT bt_index_check('$i', heapallindexed => true)");
		is($rc, 0, "cycle $cycle: bt_index_check($i, heapallindexed)") or diag($err);
		($rc, $out, $err) = $node->psql('postgres',
			"SELECT bt_index_parent_check('$i', heapallindexed => true, rootdescend => true)");
		is($rc, 0, "cycle $cycle: bt_index_parent_check($i)") or diag($err);
	}
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
