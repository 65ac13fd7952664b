# HA on a real engine (issue 16, item 6; docs/backups.md, "Patroni"): Patroni (Debian's
# patroni, etcd3 DCS) with one etcd (Debian's etcd-server), all on 127.0.0.1, manages a
# three-node encrypted cluster:
#   - bootstrap through `pg_cmk initdb` (a custom bootstrap method), replicas through
#     `pg_cmk basebackup` (a create_replica_methods entry), one local key store and one
#     CMK for the three nodes; pg_rewind off, a diverged node is re-cloned;
#   - synchronous_mode: a client inserts one row per commit and records each commit the
#     server acknowledged; the leader's walsenders are frozen and a row is committed with
#     synchronous_commit = local (on the leader's disk only: its timeline now diverges);
#     the leader's patroni and postgres are killed with SIGKILL -> the synchronous
#     standby is promoted with every acknowledged row, without the local-only row;
#   - the old leader's patroni restarted -> it is re-cloned through the replica method
#     (its timeline diverged) and rejoins as a replica with every row;
#   - the shared CMK disabled -> every node's postgres is down within check_interval +
#     3 s and stays down while Patroni tries to restart it (the FATAL refusal in its
#     log); re-enabled -> Patroni brings the three nodes back, nothing lost;
#   - the marker scan over every node's data directory finds nothing; over a stock
#     pg_basebackup of the leader (the plaintext control) it finds the marker.
# Every process (etcd, three patronis, their postgres) is started and stopped here, and
# killed by the END block if the test dies.
use strict;
use warnings;

use File::Path qw(make_path);
use HTTP::Tiny;
use JSON::PP;
use POSIX ();
use Time::HiRes qw(time sleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use CmkTest;

plan skip_all => 'encrypted-only test' if CmkTest::is_plain_mode();

sub find_bin
{
	my ($name) = @_;
	for my $d (split(/:/, $ENV{PATH} // ''), '/usr/bin', '/usr/sbin')
	{
		return "$d/$name" if -x "$d/$name";
	}
	return undef;
}
my $patroni_bin = find_bin('patroni');
my $etcd_bin    = find_bin('etcd');
plan skip_all => 'patroni is not installed (Debian package patroni)' unless $patroni_bin;
plan skip_all => 'etcd is not installed (Debian package etcd-server)' unless $etcd_bin;

my $t_start  = time;
my $bindir   = '/usr/lib/postgresql/15/bin';
my $pg_cmk   = find_bin('pg_cmk') // "$bindir/pg_cmk";
my $marker   = 'CMKPATRONIMARKER' . int(rand(1_000_000_000));
my $interval = 1;                                            # cmk_lakebase.check_interval, s
my $base     = PostgreSQL::Test::Utils::tempdir('patroni');
my $sockdir  = PostgreSQL::Test::Utils::tempdir_short();
my $store    = CmkTest::new_key_store();
my $key      = CmkTest::create_key($store);
my $http     = HTTP::Tiny->new(timeout => 3);

# --- processes: each started in its own session, killed by group at the end ---------
my @spawned;    # [pid, what]
my @nodes;

sub spawn
{
	my ($log, @cmd) = @_;
	my $pid = fork() // die "fork: $!";
	if ($pid == 0)
	{
		POSIX::setsid();
		open(STDIN,  '<',  '/dev/null') or POSIX::_exit(126);
		open(STDOUT, '>>', $log)        or POSIX::_exit(126);
		open(STDERR, '>&', \*STDOUT)    or POSIX::_exit(126);
		exec(@cmd) or POSIX::_exit(127);
	}
	push @spawned, [ $pid, "@cmd" ];
	print "# spawned $pid: @cmd\n";
	return $pid;
}

# A process is alive if it exists and is not a zombie.
sub alive
{
	my ($pid) = @_;
	return 0 unless $pid;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh> // '';
	close $fh;
	$stat =~ s/^.*\)\s+//s;
	return (split /\s+/, $stat)[0] ne 'Z';
}

sub children_of
{
	my ($ppid) = @_;
	my @kids;
	opendir(my $dh, '/proc') or return ();
	for my $e (readdir $dh)
	{
		next unless $e =~ /^\d+$/;
		open(my $fh, '<', "/proc/$e/stat") or next;
		my $stat = <$fh> // '';
		close $fh;
		$stat =~ s/^.*\)\s+//s;
		my (undef, $p) = split /\s+/, $stat;
		push @kids, $e if defined $p && $p == $ppid;
	}
	closedir $dh;
	return @kids;
}

sub postmaster_pid
{
	my ($datadir) = @_;
	open(my $fh, '<', "$datadir/postmaster.pid") or return undef;
	my $pid = <$fh>;
	close $fh;
	return undef unless defined $pid && $pid =~ /^(\d+)/;
	return alive($1) ? $1 : undef;
}

# SIGKILL a postmaster and its children together (frozen first so it forks nothing
# more), as a machine failure would; waits until they are gone.
sub kill_postgres
{
	my ($datadir) = @_;
	my $pid = postmaster_pid($datadir) or return;
	kill 'STOP', $pid;
	my @victims = ($pid, children_of($pid));
	kill 'KILL', @victims;
	my $deadline = time + 30;
	sleep 0.05 while time < $deadline && grep { alive($_) } @victims;
	return;
}

sub kill_patroni
{
	my ($node, $sig) = @_;
	return unless $node->{pid};
	kill $sig, -$node->{pid};
	my $deadline = time + 60;
	while (time < $deadline && alive($node->{pid}))
	{
		waitpid($node->{pid}, POSIX::WNOHANG());
		sleep 0.1;
	}
	waitpid($node->{pid}, 0) unless alive($node->{pid});
	$node->{pid} = undef;
	return;
}

my $etcd_pid;
# run_all.sh's timeout sends SIGTERM: leave through exit so that the END block runs.
$SIG{$_} = sub { diag("095_patroni: caught a signal, cleaning up"); exit 1 } for qw(TERM INT HUP);
END
{
	# Whatever happened: nothing started here outlives the test.
	local $?;    # keep the test's exit status
	kill 'KILL', -$_->{pid} for grep { $_->{pid} } @nodes;
	kill_postgres($_->{datadir}) for @nodes;
	kill 'KILL', -$_->[0] for @spawned;
	waitpid($_->[0], 0) for @spawned;
}

# --- etcd -----------------------------------------------------------------------
my $etcd_port      = PostgreSQL::Test::Cluster::get_free_port();
my $etcd_peer_port = PostgreSQL::Test::Cluster::get_free_port();
$etcd_pid = spawn("$base/etcd.log", $etcd_bin, '--name', 'cmk', '--data-dir', "$base/etcd",
	'--listen-client-urls',  "http://127.0.0.1:$etcd_port",
	'--advertise-client-urls', "http://127.0.0.1:$etcd_port",
	'--listen-peer-urls',    "http://127.0.0.1:$etcd_peer_port",
	'--initial-advertise-peer-urls', "http://127.0.0.1:$etcd_peer_port",
	'--initial-cluster', "cmk=http://127.0.0.1:$etcd_peer_port",
	'--initial-cluster-state', 'new');
my $etcd_ok = 0;
for (1 .. 100)
{
	my $r = $http->get("http://127.0.0.1:$etcd_port/health");
	if ($r->{success} && $r->{content} =~ /"health":\s*"true"/) { $etcd_ok = 1; last }
	sleep 0.2;
}
ok($etcd_ok, "etcd answers on 127.0.0.1:$etcd_port") or BAIL_OUT('etcd did not start: ' . slurp_file("$base/etcd.log"));

# --- the two scripts Patroni calls (docs/backups.md shows the same) -----------------
my $bootstrap_script = "$base/cmk_bootstrap.sh";
my $replica_script   = "$base/cmk_replica.sh";
my $replica_calls    = "$base/replica_method.calls";

sub write_script
{
	my ($path, $text) = @_;
	open(my $fh, '>', $path) or die "$path: $!";
	print $fh $text;
	close $fh;
	chmod 0755, $path or die "chmod $path: $!";
	return;
}
write_script($bootstrap_script, <<"EOS");
#!/bin/sh
# Patroni bootstrap.method "cmk_initdb": called with --scope=NAME --datadir=DIR.
set -eu
datadir=
for arg in "\$@"; do
	case "\$arg" in
		--datadir=*) datadir=\${arg#--datadir=} ;;
	esac
done
[ -n "\$datadir" ] || { echo "cmk_bootstrap: --datadir is missing" >&2; exit 2; }
exec $pg_cmk initdb -D "\$datadir" --key-store $store --key-id $key -- \\
	--locale=C -E UTF8 -A trust -U postgres
EOS
write_script($replica_script, <<"EOS");
#!/bin/sh
# Patroni create_replica_methods entry "cmk_basebackup": called with --scope=NAME
# --role=replica --datadir=DIR --connstring=CONNINFO (the member to clone from).
set -eu
datadir=
connstring=
for arg in "\$@"; do
	case "\$arg" in
		--datadir=*) datadir=\${arg#--datadir=} ;;
		--connstring=*) connstring=\${arg#--connstring=} ;;
	esac
done
[ -n "\$datadir" ] && [ -n "\$connstring" ] || { echo "cmk_replica: --datadir/--connstring missing" >&2; exit 2; }
echo "\$datadir" >>$replica_calls   # test only: counts the clones
exec $pg_cmk basebackup -D "\$datadir" --key-store $store --key-id $key -- \\
	-d "\$connstring" -X stream -c fast
EOS

# --- three Patroni nodes ---------------------------------------------------------
for my $i (1 .. 3)
{
	my $dir = "$base/node$i";
	make_path($dir);
	my $node = {
		name    => "node$i",
		dir     => $dir,
		datadir => "$dir/data",
		pgport  => PostgreSQL::Test::Cluster::get_free_port(),
		rport   => PostgreSQL::Test::Cluster::get_free_port(),
		log     => "$dir/patroni.log",
		conf    => "$dir/patroni.yml",
	};
	my $t = JSON::PP::true;
	my $f = JSON::PP::false;
	my %conf = (
		scope     => 'cmkha',
		namespace => '/cmk_lakebase_test/',
		name      => $node->{name},
		log       => { level => 'INFO' },
		restapi   => {
			listen          => "127.0.0.1:$node->{rport}",
			connect_address => "127.0.0.1:$node->{rport}"
		},
		etcd3     => { host => "127.0.0.1:$etcd_port" },
		bootstrap => {
			dcs => {
				ttl                     => 10,
				loop_wait               => 1,
				retry_timeout           => 5,
				maximum_lag_on_failover => 16 * 1024 * 1024,
				synchronous_mode        => $t,
				postgresql              => {
					use_pg_rewind                              => $f,
					remove_data_directory_on_rewind_failure    => $t,
					remove_data_directory_on_diverged_timelines => $t,
					use_slots                                  => $t,
					parameters                                 => {
						wal_level             => 'replica',
						hot_standby           => 'on',
						max_wal_senders       => 10,
						max_replication_slots => 10,
						wal_keep_size         => '128MB',
					},
				},
			},
			method     => 'cmk_initdb',
			cmk_initdb => { command => $bootstrap_script, keep_existing_recovery_conf => $f },
		},
		postgresql => {
			listen          => "127.0.0.1:$node->{pgport}",
			connect_address => "127.0.0.1:$node->{pgport}",
			data_dir        => $node->{datadir},
			bin_dir         => $bindir,
			pgpass          => "$dir/pgpass",
			use_unix_socket => $f,
			authentication  => {
				superuser   => { username => 'postgres' },
				replication => { username => 'replicator' },
			},
			# Patroni writes postgresql.conf itself: the preload goes here.
			parameters => {
				shared_preload_libraries       => 'cmk_lakebase',
				'cmk_lakebase.check_interval'  => "${interval}s",
				unix_socket_directories        => $sockdir,
				fsync                          => 'on',
			},
			pg_hba => [
				'local all all trust',
				'host all all 127.0.0.1/32 trust',
				'host replication all 127.0.0.1/32 trust',
			],
			create_replica_methods => ['cmk_basebackup'],
			cmk_basebackup         => { command => $replica_script, keep_data => $f },
		},
	);
	open(my $fh, '>', $node->{conf}) or die "$node->{conf}: $!";
	print $fh JSON::PP->new->canonical->pretty->encode(\%conf);    # JSON is YAML
	close $fh;
	push @nodes, $node;
}

sub start_patroni
{
	my ($node) = @_;
	$node->{pid} = spawn($node->{log}, $patroni_bin, $node->{conf});
	return;
}

# The cluster as Patroni's REST API reports it (from the first node that answers).
sub cluster_state
{
	for my $n (@nodes)
	{
		next unless $n->{pid};
		my $r = $http->get("http://127.0.0.1:$n->{rport}/cluster");
		next unless $r->{success};
		my $c = eval { decode_json($r->{content}) } or next;
		return $c;
	}
	return undef;
}

sub describe
{
	my ($c) = @_;
	return 'no answer' unless $c;
	return join(', ',
		map { sprintf('%s %s/%s tl=%s lag=%s', $_->{name}, $_->{role}, $_->{state}, $_->{timeline} // '-', $_->{lag} // '-') }
		  @{ $c->{members} // [] });
}

sub node_by_name
{
	my ($name) = @_;
	my ($n) = grep { $_->{name} eq $name } @nodes;
	return $n;
}

# Waits until $cond->(cluster) holds; returns the cluster or undef (and says why).
sub wait_cluster
{
	my ($what, $timeout, $cond) = @_;
	my $t0 = time;
	my $c;
	while (time - $t0 < $timeout)
	{
		$c = cluster_state();
		return $c if $c && $cond->($c);
		sleep 0.3;
	}
	diag("timed out after $timeout s waiting for: $what; cluster: " . describe($c));
	return undef;
}

# Three members running, one leader, one synchronous standby, everyone on the
# leader's timeline.
sub healthy
{
	my ($c) = @_;
	my @m = @{ $c->{members} // [] };
	return 0 unless @m == 3 && !grep { $_->{state} ne 'running' } @m;
	my @leaders = grep { $_->{role} eq 'leader' } @m;
	return 0 unless @leaders == 1 && grep { $_->{role} eq 'sync_standby' } @m;
	return !grep { ($_->{timeline} // -1) != $leaders[0]{timeline} } @m;
}

sub leader_of
{
	my ($c) = @_;
	my ($l) = grep { $_->{role} eq 'leader' } @{ $c->{members} // [] };
	return $l ? node_by_name($l->{name}) : undef;
}

sub psql
{
	my ($node, $sql, %opt) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'psql', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', $node->{pgport},
			'-U', 'postgres', '-d', 'postgres', '-c', $sql ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout($opt{timeout} // 60));
	chomp $out;
	return wantarray ? ($? >> 8, $out, $err) : $out;
}

sub log_size { my ($n) = @_; return -s $n->{log} // 0 }

sub clone_count
{
	my ($node) = @_;
	return 0 unless -f $replica_calls;
	return scalar grep { $_ eq $node->{datadir} } split /\n/, slurp_file($replica_calls);
}

# --- bootstrap --------------------------------------------------------------------
my $t0 = time;
start_patroni($_) for @nodes;
my $c = wait_cluster('three nodes bootstrapped, one leader, a synchronous standby', 240, \&healthy);
ok($c, sprintf('Patroni bootstrapped the cluster in %.1f s: %s', time - $t0, describe($c)))
  or BAIL_OUT('the cluster did not come up; logs in ' . $base);
my $leader = leader_of($c);
my @replicas = grep { $_ != $leader } @nodes;

like(slurp_file($leader->{log}), qr/Running custom bootstrap script: \Q$bootstrap_script\E/,
	'the leader was bootstrapped by the custom method (pg_cmk initdb)');
for my $r (@replicas)
{
	is(clone_count($r), 1, "$r->{name} was created by the cmk_basebackup replica method");
	like(slurp_file($r->{log}), qr/replica has been created using cmk_basebackup/, "$r->{name}: Patroni says so too");
}
for my $n (@nodes)
{
	my ($rc, $out) = CmkTest::pg_cmk('status', '-D', $n->{datadir});
	like($out, qr/\Q$key\E/, "$n->{name} is encrypted under the shared CMK");
	is(psql($n, "SELECT current_setting('shared_preload_libraries')"), 'cmk_lakebase', "$n->{name} runs with the layer");
}
is(psql($leader, 'SHOW synchronous_standby_names') ne '', 1, 'synchronous_mode: the leader has a synchronous standby');

# --- writes: one row per commit, every acknowledged commit recorded -------------------
psql($leader, "CREATE TABLE t (id int PRIMARY KEY, v text)");
psql($leader, "INSERT INTO t SELECT g, '$marker-' || g || repeat('p', 200) FROM generate_series(1, 5000) g");
# psql runs one INSERT per transaction (autocommit) and prints the id only once the
# commit returned: every id on its output is a commit the server acknowledged.
my $script = "$base/writer.sql";
open(my $wfh, '>', $script) or die "$script: $!";
print $wfh "INSERT INTO t VALUES ($_, '$marker-ack-$_') RETURNING id;\n" for 100001 .. 160000;
close $wfh;
my ($w_out, $w_err) = ('', '');
my $writer = IPC::Run::start(
	[ 'psql', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', $leader->{pgport}, '-U', 'postgres',
		'-d', 'postgres', '-f', $script ],
	'<', \undef, '>', \$w_out, '2>', \$w_err);
sleep 3;

# Diverge the leader: its walsenders frozen, a commit on its own disk only.
my @walsenders = split /\n/, psql($leader, 'SELECT pid FROM pg_stat_replication');
is(scalar @walsenders, 2, 'the leader streams to two replicas');
kill 'STOP', @walsenders;
my ($rc, $out, $err) = psql($leader, "SET synchronous_commit = local; INSERT INTO t VALUES (90001, '$marker-localonly')");
is($rc, 0, 'a row committed on the leader only (synchronous_commit = local, walsenders frozen)') or diag($err);
sleep 0.5;

# The leader fails: its patroni and its postgres killed.
my $old = $leader;
kill_patroni($old, 'KILL');
kill_postgres($old->{datadir});
my $t_kill = time;
eval { $writer->finish };    # the connection is gone: psql stops
my @acked = grep { /^\d+$/ } split /\n/, $w_out;
cmp_ok(scalar @acked, '>', 50, scalar(@acked) . ' commits acknowledged before the leader died');
ok(!alive(postmaster_pid($old->{datadir}) // 0), "$old->{name}: patroni and postgres are gone");

$c = wait_cluster('a replica promoted', 120,
	sub { my $l = leader_of($_[0]); $l && $l != $old && grep({ $_->{name} eq $l->{name} && $_->{state} eq 'running' } @{ $_[0]{members} }) });
ok($c, sprintf('failover: %s', describe($c)));
$leader = $c ? leader_of($c) : $replicas[0];
# Patroni takes the leader key first, then promotes: wait for the promotion to end.
my $promoted = 0;
for (1 .. 150)
{
	my ($r, $o) = psql($leader, 'SELECT NOT pg_is_in_recovery()');
	if ($r == 0 && $o eq 't') { $promoted = 1; last }
	sleep 0.2;
}
ok($promoted, sprintf('%s is the new primary, %.1f s after the kill (ttl 10)', $leader->{name}, time - $t_kill));

my %have = map { $_ => 1 } split /\n/, psql($leader, 'SELECT id FROM t WHERE id > 100000');
my @lost = grep { !$have{$_} } @acked;
is(scalar @lost, 0, sprintf('every acknowledged commit (%d) is on the new leader', scalar @acked))
  or diag("lost: @lost[0 .. ($#lost < 9 ? $#lost : 9)]");
is(psql($leader, 'SELECT count(*) FROM t WHERE id <= 5000'), 5000, 'the bulk rows are on the new leader');
is(psql($leader, 'SELECT count(*) FROM t WHERE id = 90001'), 0, 'the local-only row is not (the old leader diverged)');

# --- the old leader rejoins, re-cloned ---------------------------------------------
my $clones_before = clone_count($old);
start_patroni($old);
$t0 = time;
$c = wait_cluster("$old->{name} rejoins as a replica", 240,
	sub { healthy($_[0]) && leader_of($_[0]) != $old });
ok($c, sprintf('%s rejoined in %.1f s: %s', $old->{name}, time - $t0, describe($c)));
is(clone_count($old), $clones_before + 1, "$old->{name} was re-cloned through the cmk_basebackup method");
my $old_log = slurp_file($old->{log});
like($old_log, qr/reinitializing due to diverged timelines/, "$old->{name}: Patroni found its timeline diverged");
like($old_log, qr/replica has been created using cmk_basebackup/, "$old->{name}: and re-created it with cmk_basebackup");

psql($leader, "INSERT INTO t VALUES (90002, '$marker-after-rejoin')");
my $want = psql($leader, 'SELECT count(*), sum(hashtext(v)) FROM t');
for my $n (grep { $_ != $leader } @nodes)
{
	my $ok = 0;
	for (1 .. 100)
	{
		if (psql($n, 'SELECT count(*), sum(hashtext(v)) FROM t') eq $want) { $ok = 1; last }
		sleep 0.2;
	}
	ok($ok, "$n->{name} has every row ($want)");
}
%have = map { $_ => 1 } split /\n/, psql($old, 'SELECT id FROM t WHERE id > 100000');
is(scalar(grep { !$have{$_} } @acked), 0, "$old->{name}: every acknowledged commit");
is(psql($old, 'SELECT count(*) FROM t WHERE id = 90001'), 0, "$old->{name}: its own diverged row is gone");

# --- the kill switch: the shared CMK disabled -----------------------------------------
$want = psql($leader, 'SELECT count(*), sum(hashtext(v)) FROM t');
my %pm = map { $_->{name} => postmaster_pid($_->{datadir}) } @nodes;
is(scalar(grep { $_ } values %pm), 3, 'three postmasters run before the CMK is disabled');
my %log_off = map { $_->{name} => log_size($_) } @nodes;
my $t_disable = time;
($rc) = CmkTest::pg_cmk('key', 'disable', $key, '--key-store', $store);
is($rc, 0, 'pg_cmk key disable (the shared CMK)');
my $all_down;
while (time - $t_disable < $interval + 10)
{
	if (!grep { alive($_) } values %pm) { $all_down = time - $t_disable; last }
	sleep 0.05;
}
ok(defined $all_down, 'every node\'s postgres went down');
cmp_ok($all_down // 99, '<', $interval + 3,
	sprintf('all three down in %.2f s (bound: check_interval %d s + 3 s)', $all_down // -1, $interval));

# Stays down: for 10 s no node accepts a connection, while Patroni tries to restart.
my $up = 0;
my $t_watch = time;
while (time - $t_watch < 10)
{
	for my $n (@nodes)
	{
		system("pg_isready -q -h 127.0.0.1 -p $n->{pgport} -t 1 >/dev/null 2>&1");
		$up++ if $? == 0;
	}
	sleep 0.3;
}
is($up, 0, 'no node accepted a connection for 10 s with the CMK disabled');
my $refused = 0;
for my $n (@nodes)
{
	my $log = slurp_file($n->{log}, $log_off{ $n->{name} });
	like($log, qr/cmk_lakebase: key "\Q$key\E" of provider "local" is revoked/, "$n->{name}: the watchdog shut it down");
	$refused++ if $log =~ /FATAL:  cmk_lakebase: could not unwrap the key-encryption key with key "\Q$key\E"/;
}
cmp_ok($refused, '>=', 1, "Patroni's restarts were refused (FATAL on $refused node(s))");

# Re-enabled: Patroni brings the cluster back.
($rc) = CmkTest::pg_cmk('key', 'enable', $key, '--key-store', $store);
is($rc, 0, 'pg_cmk key enable');
$t0 = time;
$c = wait_cluster('the cluster back after the CMK is re-enabled', 240, \&healthy);
ok($c, sprintf('Patroni brought the cluster back in %.1f s: %s', time - $t0, describe($c)));
$leader = $c ? leader_of($c) : $leader;
is(psql($leader, 'SELECT count(*), sum(hashtext(v)) FROM t'), $want, 'nothing lost: same row count and checksum on the leader');
psql($leader, "INSERT INTO t VALUES (90003, '$marker-after-reenable')");
$want = psql($leader, 'SELECT count(*), sum(hashtext(v)) FROM t');
for my $n (grep { $_ != $leader } @nodes)
{
	my $ok = 0;
	for (1 .. 150)
	{
		my ($r, $o) = psql($n, 'SELECT count(*), sum(hashtext(v)) FROM t');
		if ($r == 0 && $o eq $want) { $ok = 1; last }
		sleep 0.2;
	}
	ok($ok, "$n->{name} back with every row and follows the leader");
}

# --- marker scan: every node's data directory; the plaintext control ------------------
psql($leader, 'CHECKPOINT');
$rc = system('pg_basebackup', '-D', "$base/control", '-h', '127.0.0.1', '-p', $leader->{pgport}, '-U', 'postgres',
	'-X', 'stream', '-c', 'fast');
is($rc, 0, 'stock pg_basebackup of the leader (the plaintext control)');
my @control_hits = CmkTest::scan_for_markers("$base/control", $marker);
ok(@control_hits > 0, 'control: the marker scan finds the marker in the stock pg_basebackup copy');
for my $n (@nodes)
{
	is_deeply([ CmkTest::scan_for_markers($n->{datadir}, $marker) ], [], "$n->{name}: no marker in its data directory");
}

# --- stop: patroni stops its postgres, then etcd --------------------------------------
kill_patroni($_, 'TERM') for @nodes;
ok(!grep({ postmaster_pid($_->{datadir}) } @nodes), 'Patroni stopped every postgres');
kill 'TERM', $etcd_pid;
waitpid($etcd_pid, 0);
@spawned = grep { $_->[0] != $etcd_pid } @spawned;
note(sprintf('095_patroni wall time: %.1f s', time - $t_start));

done_testing();
