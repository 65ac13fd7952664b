# Key lifecycle (issue 5): rotation of each kind without re-encryption.
#
# 1. With the load stopped, a sha256 of every relation, SLRU and (completed) WAL file
#    before and after rewrap, bind_cluster and rotate_kek: no data file is rewritten.
# 2. Under pgbench load: `pg_cmk key rotate` + rewrap(), bind_cluster() to another CMK
#    and back, rotate_kek() twice: no client error, no aborted client, no restart (same
#    postmaster), new connections work throughout, a table not being written keeps its
#    files byte for byte, the TPC-B balances agree, and the server restarts on the new
#    keys.
# 3. A crash injected at each named step of each rotation, in the server
#    (cmk_lakebase.test_crash_at: the backend SIGKILLs itself, the postmaster restarts
#    its children, then the whole server is killed and started) and offline (pg_cmk
#    with CMK_LAKEBASE_TEST_CRASH_AT): every time the server starts, the data is
#    intact, and the keyring is in the old or the new state as the step implies (an
#    interrupted KEK rotation is completed at start).
# 4. Rotating while the key provider is unavailable fails cleanly, changes nothing, and
#    the cluster keeps serving.
# 5. The audit trail: rows for each action with the expected fields, rotation to
#    audit.log.1 at the size limit, the kill switch recorded, rows surviving restarts.

use strict;
use warnings;

use Digest::SHA ();
use File::Find ();
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

plan skip_all => 'needs an encrypted node' if is_plain_mode();

my $node =
  new_encrypted_node('rotation', test_hooks => 1, check_interval => '1s', conf => 'autovacuum = off', start => 1);
my $pgdata = $node->data_dir;
my $store  = $node->{cmk_key_store};
my $key1   = $node->{cmk_key_id};
my $key2   = create_key($store, 'lc-second-cmk');
my ($host, $port) = ($node->host, $node->port);

$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
$node->command_ok([ 'pgbench', '-i', '-s', '2', '--quiet', '-h', $host, '-p', $port, 'postgres' ],
	'pgbench -i -s 2');
$node->safe_psql(
	'postgres', q{
	CREATE TABLE frozen (id int PRIMARY KEY, v text);
	INSERT INTO frozen SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
	VACUUM frozen;
});
$node->safe_psql('postgres',
	"SELECT cmk_lakebase.create_key_config('second', 'local', '$key2', jsonb_build_object('key_store', '$store'))"
);

sub q1 { return $node->safe_psql('postgres', $_[0]); }

sub keyring
{
	return JSON::PP::decode_json(slurp_file("$pgdata/cmk_lakebase/keyring.json"));
}

sub generation { return q1('SELECT kek_generation FROM cmk_lakebase.cmk_status()'); }
sub bound { return q1('SELECT name FROM cmk_lakebase.key_configs() WHERE bound'); }

sub balances_ok
{
	my $r = q1(
		q{SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(bbalance) FROM pgbench_branches)
		     AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT sum(bbalance) FROM pgbench_branches)
		     AND (SELECT coalesce(sum(delta), 0) FROM pgbench_history) = (SELECT sum(bbalance) FROM pgbench_branches)
		     AND (SELECT count(*) FROM pgbench_accounts) = 200000
		     AND (SELECT count(*) || '/' || sum(length(v)) FROM frozen) = '20000/640000'});
	return $r eq 't';
}

# sha256 of every durable data file: relations (base, global, tablespaces), SLRUs,
# two-phase files and WAL segments, except the WAL segment being written now.
sub data_checksums
{
	my %skip = map { $_ => 1 } @_;
	my %sum;
	File::Find::find(
		{
			no_chdir => 1,
			wanted   => sub {
				return unless -f $_;
				my $rel = substr($File::Find::name, length($pgdata) + 1);
				return unless $rel =~ m{^(base|global|pg_xact|pg_multixact|pg_twophase|pg_commit_ts|pg_subtrans|pg_wal)/};
				return if $rel =~ m{pg_internal\.init|pg_filenode\.map|PG_VERSION|pg_control|/archive_status/|\.history$};
				return if $rel =~ m{^pg_wal/} && $rel !~ m{^pg_wal/[0-9A-F]{24}$};
				return if $skip{$rel};
				$sum{$rel} = Digest::SHA->new(256)->addfile($File::Find::name)->hexdigest;
			}
		},
		$pgdata);
	return \%sum;
}

sub current_wal
{
	return 'pg_wal/' . q1('SELECT pg_walfile_name(pg_current_wal_insert_lsn())');
}

sub compare_sums
{
	my ($before, $after, $what) = @_;
	my @changed = grep { exists $after->{$_} && $after->{$_} ne $before->{$_} } sort keys %$before;
	# PostgreSQL itself recycles (renames) old WAL segments at a checkpoint.
	my @gone = grep { !exists $after->{$_} && !m{^pg_wal/} } sort keys %$before;
	is(scalar(@changed), 0, "$what: no data file that existed before changed")
	  or diag("changed: @changed[0 .. ($#changed < 9 ? $#changed : 9)]");
	is(scalar(@gone), 0, "$what: no data file disappeared") or diag("gone: @gone");
}

############################################################ 1. no re-encryption
# Freeze everything first: reads must not set hint bits (and so write pages) later.
q1('VACUUM FREEZE');
q1('SELECT * FROM cmk_lakebase.key_configs()');
q1('CHECKPOINT');
my $wal0   = current_wal();
my $before = data_checksums($wal0);
cmp_ok(scalar(keys %$before), '>', 500, 'checksummed the data files (' . scalar(keys %$before) . ')');
my $gen0 = generation();
my ($rc, $out, $err) = pg_cmk('key', 'rotate', $key1, '--key-store', $store);
is($rc, 0, 'pg_cmk key rotate adds a CMK version');
like(q1(q{SELECT action || ' ' || key_version_before || '->' || key_version FROM cmk_lakebase.rewrap()}),
	qr/^rewrap 1->2$/, 'rewrap() re-wraps the KEK under the new CMK version');
is(q1(q{SELECT key_config || ' ' || key_id FROM cmk_lakebase.bind_cluster('second')}),
	"second $key2", 'bind_cluster() moves the cluster to another CMK');
is(q1(q{SELECT kek_generation FROM cmk_lakebase.rotate_kek()}), $gen0 + 1, 'rotate_kek() bumps the generation');
is(q1(q{SELECT key_config FROM cmk_lakebase.bind_cluster('default')}), 'default', 'and back to the first CMK');
q1('CHECKPOINT');
my $after = data_checksums(current_wal(), $wal0);
delete $before->{ current_wal() };
compare_sums($before, $after, 'rewrap, bind_cluster, rotate_kek, bind_cluster');

############################################################ 2. under load
my $frozen_paths = q1(
	q{SELECT string_agg(path, ' ') FROM (
	    SELECT path FROM cmk_lakebase.relation_keys('frozen')
	    UNION ALL SELECT path FROM cmk_lakebase.relation_keys('frozen_pkey')) s});
my @frozen = split / /, $frozen_paths;
cmp_ok(scalar(@frozen), '>=', 3, 'frozen table has heap, fsm, vm and index files');
my %frozen_before = map { $_ => Digest::SHA->new(256)->addfile("$pgdata/$_")->hexdigest } @frozen;
my $ckpt_pid = q1('SELECT pid FROM pg_stat_activity WHERE backend_type = \'checkpointer\'');
my $pm_start = q1('SELECT pg_postmaster_start_time()');

my ($bench_out, $bench_err) = ('', '');
my $bench = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '30', '-h', $host, '-p', $port, 'postgres' ],
	'>', \$bench_out, '2>', \$bench_err);
sleep 3;
my $gen_load = generation();
my @ops = (
	[ 'key rotate + rewrap', sub { pg_cmk('key', 'rotate', $key1, '--key-store', $store); q1('SELECT action FROM cmk_lakebase.rewrap()') }, 'rewrap' ],
	[ 'rotate_kek',           sub { q1('SELECT action FROM cmk_lakebase.rotate_kek()') }, 'rotate_kek' ],
	[ 'bind_cluster second',  sub { q1(q{SELECT action FROM cmk_lakebase.bind_cluster('second')}) }, 'bind_cluster' ],
	[ 'rotate_kek under second', sub { q1('SELECT action FROM cmk_lakebase.rotate_kek()') }, 'rotate_kek' ],
	[ 'bind_cluster default', sub { q1(q{SELECT action FROM cmk_lakebase.bind_cluster('default')}) }, 'bind_cluster' ],
	[ 'rotate_kek again',     sub { q1('SELECT action FROM cmk_lakebase.rotate_kek()') }, 'rotate_kek' ],
);
for my $op (@ops)
{
	is($op->[1]->(), $op->[2], "under load: $op->[0]");
	# A new connection works right after the switch and sees the data.
	is(q1('SELECT count(*) FROM pgbench_branches'), '2', "under load: new connection after $op->[0]");
	sleep 2;
}
$bench->finish;
my $bench_rc = $?;
print "# pgbench stdout:\n$bench_out\n# pgbench stderr:\n$bench_err\n";
is($bench_rc, 0, 'pgbench exits 0 through all rotations');
like($bench_out, qr/number of failed transactions: 0 /, 'no failed transaction');
unlike($bench_err, qr/(error|abort|FATAL|terminat)/i, 'no client error, no aborted client');
like($bench_out, qr/number of transactions actually processed: [1-9]/, 'the load made progress');
is(q1('SELECT pg_postmaster_start_time()'), $pm_start, 'no restart: same postmaster start time');
is(q1('SELECT pid FROM pg_stat_activity WHERE backend_type = \'checkpointer\''), $ckpt_pid, 'no crash restart');
is(generation(), $gen_load + 3, 'three KEK rotations under load');
is(bound(), 'default', 'bound to the first CMK again');
q1('CHECKPOINT');
my %frozen_after = map { $_ => Digest::SHA->new(256)->addfile("$pgdata/$_")->hexdigest } @frozen;
is_deeply(\%frozen_after, \%frozen_before, 'files of a table not being written are unchanged byte for byte');
ok(balances_ok(), 'TPC-B balances agree, frozen table intact');
is(q1('SELECT cmk_lakebase.check_key_now()'), 'ok', 'the watchdog follows the rotations');
$node->restart;
ok(balances_ok(), 'after a restart on the new keys the data is intact');
is(generation(), $gen_load + 3, 'the new generation survives the restart');

############################################################ 3. crash at each step
my @steps = grep { length } split /\n/, q{
rewrap:after_wrap
rewrap:after_keyring_tmp
rewrap:after_keyring
bind_cluster:after_wrap
bind_cluster:after_keyring_tmp
bind_cluster:after_keyring
rotate_kek:after_wrap
rotate_kek:after_keyring
rotate_kek:after_keymap_tmp
rotate_kek:after_keymap
rotate_kek:after_configs
};

# What a crash at the step leaves, once the server has started.
sub expect_new { my ($step) = @_; return $step =~ /:after_keyring$|^rotate_kek:after_(keymap|configs|keymap_tmp)$/ ? 1 : 0; }

sub op_for
{
	my ($step) = @_;
	my ($op) = split /:/, $step;
	return ('SELECT action FROM cmk_lakebase.rewrap()', [ 'rewrap', '-D', $pgdata ]) if $op eq 'rewrap';
	return ('SELECT action FROM cmk_lakebase.rotate_kek()', [ 'rotate-kek', '-D', $pgdata ]) if $op eq 'rotate_kek';
	my $target = bound() eq 'default' ? 'second' : 'default';
	return ("SELECT action FROM cmk_lakebase.bind_cluster('$target')", [ 'bind', '-D', $pgdata, $target ], $target);
}

sub state_of
{
	my $k = keyring();
	return { blob => $k->{wrapped_kek}, gen => $k->{kek_generation}, name => $k->{config_name} // 'default' };
}

sub check_after
{
	my ($step, $old, $target, $how) = @_;
	my $new = state_of();
	ok(!exists keyring()->{previous}, "$how $step: no half-done rotation left after start");
	ok(balances_ok(), "$how $step: data intact after the crash and start");
	my $changed = expect_new($step);
	if ($step =~ /^rotate_kek/)
	{
		is($new->{gen}, $old->{gen} + $changed, "$how $step: KEK generation " . ($changed ? 'new' : 'old'));
	}
	elsif ($step =~ /^bind_cluster/)
	{
		is($new->{name}, $changed ? $target : $old->{name}, "$how $step: binding " . ($changed ? 'new' : 'old'));
	}
	else
	{
		is($new->{blob} ne $old->{blob} ? 1 : 0, $changed, "$how $step: wrapped KEK " . ($changed ? 'new' : 'old'));
	}
	# And the cluster still does key operations and writes.
	is(q1('SELECT action FROM cmk_lakebase.rotate_kek()'), 'rotate_kek', "$how $step: rotate_kek works afterwards");
	q1("INSERT INTO frozen_log VALUES ('$how $step')");
}
q1('CREATE TABLE frozen_log (what text)');

for my $step (@steps)
{
	# Online: the backend kills itself at the step.
	my $old = state_of();
	my ($sql, undef, $target) = op_for($step);
	my ($prc, $pout, $perr) = $node->psql('postgres', "SET cmk_lakebase.test_crash_at = '$step'; $sql");
	isnt($prc, 0, "online $step: the backend died at the step");
	like($perr, qr/server closed the connection|terminated abnormally|connection to server was lost/,
		"online $step: it was a crash");
	# The postmaster restarts its children; the server serves again from the shared keys.
	ok($node->poll_query_until('postgres', 'SELECT count(*) = 2 FROM pgbench_branches'),
		"online $step: serving again after the crash restart");
	crash_node($node);
	start_after_crash($node);
	check_after($step, $old, $target, 'online');
}

for my $step (@steps)
{
	# Offline: pg_cmk kills itself at the step.
	my $old = state_of();
	my (undef, $cmd, $target) = op_for($step);
	$node->stop;
	local $ENV{CMK_LAKEBASE_TEST_HOOKS}    = '1';
	local $ENV{CMK_LAKEBASE_TEST_CRASH_AT} = $step;
	my ($crc) = pg_cmk(@$cmd);
	is($crc, 137, "offline $step: pg_cmk died at the step");
	delete local $ENV{CMK_LAKEBASE_TEST_CRASH_AT};
	$node->start;
	check_after($step, $old, $target, 'offline');
}

$node->stop;
my ($orc, $oout) = pg_cmk('rotate-kek', '-D', $pgdata);
is($orc, 0, 'pg_cmk rotate-kek on the stopped cluster');
like($oout, qr/kek_generation: (\d+) -> (\d+)/, 'it reports the generations');
$node->start;
ok(balances_ok(), 'data intact after an offline KEK rotation');
my ($src, $sout, $serr) = pg_cmk('status', '-D', $pgdata);
is($src, 0, 'pg_cmk status: usable after all crashes');
($src, $sout, $serr) = pg_cmk('rotate-kek', '-D', $pgdata);
is($src, 1, 'pg_cmk refuses a running cluster');
like($serr, qr/is running; use the SQL functions/, 'and says what to do instead');

############################################################ 4. provider unavailable
my $gen_u = generation();
my $blob_u = keyring()->{wrapped_kek};
rename($store, "$store.away") or die "rename $store: $!";
my $other = bound() eq 'default' ? 'second' : 'default';
for my $fn ('rotate_kek()', 'rewrap()', "bind_cluster('$other')")
{
	my ($urc, $uout, $uerr) = $node->psql('postgres', "SELECT * FROM cmk_lakebase.$fn");
	like($uerr, qr/could not .*: the key provider is unavailable/, "$fn while the key store is away: clear error");
}
is(generation(), $gen_u, 'nothing rotated');
is(keyring()->{wrapped_kek}, $blob_u, 'keyring unchanged');
ok(balances_ok(), 'the cluster keeps serving while the provider is unavailable');
rename("$store.away", $store) or die "rename back: $!";
is(q1('SELECT kek_generation FROM cmk_lakebase.rotate_kek()'), $gen_u + 1, 'rotation works once it is back');

############################################################ 5. audit trail
my $audit = q1(
	q{SELECT string_agg(DISTINCT action || '/' || outcome || '/' || actor, ' ' ORDER BY action || '/' || outcome || '/' || actor)
	  FROM cmk_lakebase.audit_log});
print "# audit actions: $audit\n";
for my $want ('rewrap/ok/', 'rotate_kek/ok/', 'bind_cluster/ok/', 'wrap/ok/', 'unwrap/ok/postmaster',
	'status/ok/watchdog', 'unwrap/ok/watchdog', 'rotate_kek/unavailable/', 'rotate_kek/ok/pg_cmk',
	'rotate_kek/ok/postmaster',
	'create_key_config/ok/')
{
	like($audit, qr/\Q$want\E/, "audit trail has $want");
}
is(q1(q{SELECT count(*) FROM cmk_lakebase.audit_log
        WHERE action IN ('rewrap','rotate_kek','bind_cluster') AND outcome = 'ok'
          AND (event_time IS NULL OR provider IS NULL OR key_id IS NULL OR actor IS NULL OR pid IS NULL)}),
	'0', 'rotation rows have time, actor, provider, key id, pid');
is(q1(q{SELECT count(*) > 0 FROM cmk_lakebase.audit_log WHERE action = 'rotate_kek' AND detail LIKE '%completed an interrupted%'}),
	't', 'completing an interrupted rotation is recorded');
my $raw = slurp_file("$pgdata/cmk_lakebase/audit.log");
my $fields = join ',', sort qw(time pid actor action key_config provider key_id key_version kek_generation
  request_id outcome detail count);
my @bad = grep {
	my $o = eval { JSON::PP::decode_json($_) };
	!$o || join(',', sort keys %$o) ne $fields
} split /\n/, $raw;
is(scalar(@bad), 0, 'every audit line is one JSON object with exactly the documented fields (no key material)')
  or diag("first: $bad[0]");
unlike($raw, qr/\Q@{[ keyring()->{wrapped_kek} ]}\E/, 'not even the wrapped KEK is in the audit file');

# Bounded size: rotate to audit.log.1 past audit_max_size; the view reads both.
my $rows_before = q1('SELECT count(*) FROM cmk_lakebase.audit_log');
$node->append_conf('postgresql.conf', 'cmk_lakebase.audit_max_size = 64kB');
$node->reload;
sleep 1;
q1('SELECT count(*) FROM (SELECT cmk_lakebase.cmk_status() FROM generate_series(1, 400)) s');
ok(-f "$pgdata/cmk_lakebase/audit.log.1", 'audit.log rotated to audit.log.1');
cmp_ok(-s "$pgdata/cmk_lakebase/audit.log", '<', 80 * 1024, 'audit.log stays bounded');

# Kill switch: recorded by the watchdog, readable after the restart.
pg_cmk('key', 'disable', $key1, '--key-store', $store);
my $deadline = time + 30;
sleep 1 while node_is_running($node) && time < $deadline;
ok(!node_is_running($node), 'the watchdog stops the cluster when the CMK is disabled');
$node->{_pid} = undef;
like(slurp_file("$pgdata/cmk_lakebase/audit.log"), qr/"actor":"watchdog","action":"kill_switch"/,
	'kill switch recorded in the audit file');
pg_cmk('key', 'enable', $key1, '--key-store', $store);
start_after_crash($node);
is(q1(q{SELECT count(*) > 0 FROM cmk_lakebase.audit_log WHERE action = 'kill_switch' AND actor = 'watchdog'}),
	't', 'the audit trail survives the restart');
ok(balances_ok(), 'data intact at the end');
$node->stop;

done_testing();
