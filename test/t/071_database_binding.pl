# Databases bound to key configurations of their own (issue 5).
#
# 1. Binding: a database "app" is bound to its own key configuration (a second local
#    CMK) online; its data files are byte for byte unchanged (no re-encryption), each
#    segment keeps its DEK (same fingerprints), the DEKs now live in the database's
#    key map under cmk_lakebase/db/<oid>/, and writes keep working (a pgbench load on
#    app runs through the binding without an error). "other" stays on the cluster key.
# 2. The DEKs really are under the database's CMK: with that CMK disabled and the
#    server stopped, the stock pg_checksums run through "pg_cmk exec" cannot read the
#    database's files (while with the CMK enabled it passes).
# 3. Revocation of the database's CMK while running: the app session is terminated
#    within check_interval + 3 s, new connections to app are refused with a clear
#    message, "other" keeps serving throughout (a pgbench load on it has no error, a
#    CHECKPOINT succeeds), rows committed just before the revocation are not lost.
#    A restart with the key still disabled starts the cluster, app stays refused.
#    The key enabled again: the watchdog opens app again without a restart; amcheck
#    finds the tables and indexes intact.
# 4. A crash injected at each step of bind, rebind and unbind: the server starts,
#    the data is intact, the binding is in the old or the new state as the step
#    implies.
# 5. Re-binding to a third CMK (only the database keyring changes), unbinding (DEKs
#    back under the cluster KEK), a new database inheriting the cluster key, DROP
#    DATABASE of a bound database forgetting its binding.
# 6. Audit rows for each action with the expected fields.

use strict;
use warnings;

use Digest::SHA ();
use IPC::Run ();
use JSON::PP ();
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

plan skip_all => 'needs an encrypted node' if is_plain_mode();

my $check_interval = 1;
my $node = new_encrypted_node('dbbind', test_hooks => 1, check_interval => "${check_interval}s",
	conf => 'autovacuum = off', start => 1);
my $pgdata = $node->data_dir;
my $store  = $node->{cmk_key_store};
my $key_db = create_key($store, 'db-app-cmk');
my $key_3  = create_key($store, 'db-app-third');
my ($host, $port) = ($node->host, $node->port);

sub q1 { my ($db, $sql) = @_; return $node->safe_psql($db, $sql); }

q1('postgres', 'CREATE EXTENSION cmk_lakebase');
q1('postgres', 'CREATE DATABASE app');
q1('postgres', 'CREATE DATABASE other');
for my $db ('app', 'other')
{
	q1($db, 'CREATE EXTENSION amcheck');
	q1($db, 'CREATE EXTENSION cmk_lakebase');
	$node->command_ok([ 'pgbench', '-i', '-s', '1', '--quiet', '-h', $host, '-p', $port, $db ], "pgbench -i $db");
}
q1('app', q{
	CREATE TABLE ledger (id int PRIMARY KEY, v text);
	INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
	CREATE INDEX ledger_v ON ledger (v);
	VACUUM ledger;
});
for my $c ([ 'appcfg', $key_db ], [ 'thirdcfg', $key_3 ])
{
	q1('postgres',
		"SELECT cmk_lakebase.create_key_config('$c->[0]', 'local', '$c->[1]', jsonb_build_object('key_store', '$store'))");
}
my $app_oid   = q1('postgres', "SELECT oid FROM pg_database WHERE datname = 'app'");
my $other_oid = q1('postgres', "SELECT oid FROM pg_database WHERE datname = 'other'");
my $dbdir     = "$pgdata/cmk_lakebase/db/$app_oid";

sub files_sha
{
	my ($oid) = @_;
	my %h;
	opendir(my $dh, "$pgdata/base/$oid") or die "opendir: $!";
	for my $f (grep { /^\d+(_\w+)?(\.\d+)?$/ } readdir $dh)
	{
		$h{$f} = Digest::SHA->new(256)->addfile("$pgdata/base/$oid/$f")->hexdigest;
	}
	closedir $dh;
	return \%h;
}

sub fingerprints
{
	my ($db) = @_;
	return q1($db,
		q{SELECT string_agg(c.relname || '/' || k.fork || '/' || k.segno || '=' || k.dek_fingerprint, ',' ORDER BY 1)
		  FROM pg_class c, cmk_lakebase.relation_keys(c.oid) k
		  WHERE c.relkind IN ('r', 'i') AND c.relnamespace = 'public'::regnamespace});
}

sub db_state
{
	return q1('postgres', "SELECT state FROM cmk_lakebase.database_keys() WHERE database_oid = $app_oid");
}

sub app_intact
{
	my $r = $node->safe_psql(
		'app', q{
		SELECT (SELECT count(*) || '/' || sum(length(v)) FROM ledger WHERE id <= 20000) = '20000/640000'
		   AND (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(bbalance) FROM pgbench_branches)});
	return $r eq 't';
}

sub amcheck_ok
{
	my ($db) = @_;
	my ($rc, $out, $err) = $node->psql(
		$db, q{
		SELECT bt_index_check(c.oid, true) FROM pg_class c
		  WHERE c.relkind = 'i' AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'btree') AND c.relnamespace = 'public'::regnamespace;
		SELECT count(*) FROM pg_class c, verify_heapam(c.oid) v
		  WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace;});
	return $rc == 0 && $out =~ /(^|\n)0$/ ? 1 : 0;
}

sub pgbench_bg
{
	my ($db, $secs, $out) = @_;
	return IPC::Run::start(
		[ 'pgbench', '-n', '-c', '2', '-T', $secs, '-h', $host, '-p', $port, $db ],
		'<', \undef, '>', $out, '2>&1');
}

sub key_command
{
	my ($verb, $key) = @_;
	my ($rc, $out, $err) = pg_cmk('key', $verb, $key, '--key-store', $store);
	BAIL_OUT("pg_cmk key $verb failed: $err") if $rc != 0;
	return time;
}

############################################################ 1. binding, online
q1('app', 'CHECKPOINT');
my $sha_before = files_sha($app_oid);
my $fp_before  = fingerprints('app');
my $cluster_deks_before = q1('postgres', 'SELECT dek_count FROM cmk_lakebase.cmk_status()');
my $r = q1('postgres',
	"SELECT action, database_name, key_config, provider, key_id, dek_count > 100 FROM cmk_lakebase.bind_database('app', 'appcfg')");
is($r, "bind_database|app|appcfg|local|$key_db|t", 'bind_database: app bound to its own key configuration');
is_deeply(files_sha($app_oid), $sha_before, 'no data file of app was rewritten by the binding');
is(fingerprints('app'), $fp_before, 'every segment of app keeps its DEK (same fingerprints)');
ok(-f "$dbdir/keyring.json" && -f "$dbdir/keymap", 'app has its own keyring and key map');
my $dbkr = JSON::PP::decode_json(slurp_file("$dbdir/keyring.json"));
is($dbkr->{config}{key_id}, $key_db, "the database keyring names the database's CMK");
my $clkr = JSON::PP::decode_json(slurp_file("$pgdata/cmk_lakebase/keyring.json"));
isnt($dbkr->{wrapped_kek}, $clkr->{wrapped_kek}, 'the database KEK is not the cluster KEK');
unlike(slurp_file("$dbdir/keyring.json"), qr/"(kek|dek)"\s*:/, 'no plaintext key in the database keyring');
is(q1('postgres', 'SELECT dek_count FROM cmk_lakebase.cmk_status()'), $cluster_deks_before,
	'cmk_status counts every DEK, in the cluster and the database key maps');
is(q1('postgres', "SELECT database_name || '|' || state || '|' || key_config || '|' || key_id FROM cmk_lakebase.database_keys()"),
	"app|open|appcfg|$key_db", 'database_keys() shows the binding');
ok(app_intact(), 'app reads its data after the binding');

# Online: unbind and bind again while pgbench writes to app.
my $bench_out = '';
my $h = pgbench_bg('app', 8, \$bench_out);
sleep 2;
is(q1('postgres', "SELECT action FROM cmk_lakebase.unbind_database('app')"), 'unbind_database', 'unbind under load');
sleep 1;
is(q1('postgres', "SELECT action FROM cmk_lakebase.bind_database('app', 'appcfg')"), 'bind_database', 'bind under load');
q1('app', 'CREATE TABLE made_bound AS SELECT g FROM generate_series(1, 1000) g');
ok($h->finish, 'pgbench on app ran through unbind and bind without an error');
unlike($bench_out, qr/ERROR|FATAL|aborted/i, 'no client error in pgbench') or diag($bench_out);
is(q1('app', 'SELECT count(*) FROM made_bound'), '1000', 'a table created while bound is readable');
ok(amcheck_ok('app'), 'amcheck clean on app after binding under load');

############################################################ 2. offline proof: DEKs under the db CMK
$node->stop;
my ($crc, $cout, $cerr) = pg_cmk('exec', '-D', $pgdata, '--', 'pg_checksums', '--check', '-D', $pgdata);
is($crc, 0, 'pg_checksums through pg_cmk exec passes with the database key enabled');
my ($src, $sout) = pg_cmk('status', '-D', $pgdata);
like($sout, qr/^database $app_oid: key_config appcfg, provider local, key_id $key_db, .*key_state ok .*deks \d+$/m,
	'pg_cmk status lists the bound database and its usable key');
key_command('disable', $key_db);
($src, $sout) = pg_cmk('status', '-D', $pgdata);
is($src, 0, 'pg_cmk status: the cluster key is still usable');
like($sout, qr/^database $app_oid: .*key_state revoked .*deks unknown$/m, "and reports app's key revoked");
($crc, $cout, $cerr) = pg_cmk('exec', '-D', $pgdata, '--', 'pg_checksums', '--check', '-D', $pgdata);
isnt($crc, 0, "with app's CMK disabled the stopped cluster's app files cannot be read");
like($cout . $cerr, qr{base/$app_oid/}, 'the failure is on a file of app');
unlike($cout . $cerr, qr{base/$other_oid/}, 'no file of other fails');
key_command('enable', $key_db);
$node->start;

############################################################ 3. revocation while running
my $holder_out = '';
my $holder = IPC::Run::start(
	[ 'psql', '-X', '-h', $host, '-p', $port, '-d', 'app', '-c', 'SELECT pg_sleep(600)' ],
	'<', \undef, '>', \$holder_out, '2>&1');
my $other_out = '';
my $hother = pgbench_bg('other', 12, \$other_out);
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = 'app' AND query ~ 'pg_sleep'}),
	'a session holds app');
q1('app', "INSERT INTO ledger SELECT g, 'late' FROM generate_series(30001, 30100) g");    # committed, not checkpointed
my $t0 = key_command('disable', $key_db);
my $t_gone;
while (time - $t0 < 30)
{
	if ($holder->pumpable) { $holder->pump_nb; usleep(50_000); next; }
	$t_gone = time;
	last;
}
$holder->finish;
ok(defined $t_gone, 'the session on app was terminated');
my $latency = defined $t_gone ? $t_gone - $t0 : 999;
diag(sprintf('database kill switch: session terminated %.2f s after the key was disabled', $latency));
cmp_ok($latency, '<=', $check_interval + 3, 'within check_interval + 3 s');
like($holder_out, qr/terminating connection due to administrator command/, 'the client was told why');
ok($node->poll_query_until('postgres', "SELECT state = 'locked' FROM cmk_lakebase.database_keys() WHERE database_oid = $app_oid"),
	'app is locked');
my ($arc, $aout, $aerr) = $node->psql('app', 'SELECT 1');
isnt($arc, 0, 'a new connection to app is refused');
like($aerr, qr/database "app" is unavailable: its key "$key_db" of provider "local" is revoked/, 'with a clear message');
is(q1('other', 'SELECT count(*) FROM pgbench_branches'), '1', 'other keeps serving');
is(q1('other', 'CHECKPOINT; SELECT 1'), '1', 'a CHECKPOINT succeeds while app is locked');
ok($hother->finish, 'pgbench on other ran through the revocation without an error');
unlike($other_out, qr/ERROR|FATAL|aborted/i, 'no client error on other') or diag($other_out);
like(slurp_file($node->logfile), qr/database $app_oid is locked/, 'the server log says app is locked');

# Restart with the key still disabled: the cluster starts, app stays locked.
$node->restart;
is(q1('postgres', 'SELECT 1'), '1', 'the cluster starts with a database key revoked');
is(db_state(), 'locked', 'app is locked after the restart');
($arc, $aout, $aerr) = $node->psql('app', 'SELECT 1');
like($aerr, qr/database "app" is unavailable/, 'app is refused after the restart');
is(q1('other', 'SELECT count(*) FROM pgbench_branches'), '1', 'other serves after the restart');

# The key enabled again: the watchdog opens app without a restart.
my $t1 = key_command('enable', $key_db);
ok($node->poll_query_until('postgres', "SELECT state = 'open' FROM cmk_lakebase.database_keys() WHERE database_oid = $app_oid"),
	'app opens again once its key is enabled');
diag(sprintf('database reopened %.2f s after the key was enabled', time - $t1));
ok(app_intact(), 'app data intact after revocation and reopening');
is(q1('app', "SELECT count(*) FROM ledger WHERE v = 'late'"), '100', 'rows committed just before the revocation are there');
ok(amcheck_ok('app'), 'amcheck clean on app after the revocation');
ok(amcheck_ok('other'), 'amcheck clean on other');

############################################################ 4. crash at each step
my @steps = qw(
  unbind_database:after_keymap unbind_database:after_keyring
  bind_database:after_wrap bind_database:after_keymap bind_database:after_keyring
  rebind_database:after_wrap);

sub bound_to
{
	return '' unless -f "$dbdir/keyring.json";
	return JSON::PP::decode_json(slurp_file("$dbdir/keyring.json"))->{config_name} // '';
}

for my $step (@steps)
{
	my ($op) = split /:/, $step;
	my $before = bound_to();
	my $sql =
	    $op eq 'unbind_database' ? "SELECT action FROM cmk_lakebase.unbind_database('app')"
	  : $op eq 'bind_database'   ? "SELECT action FROM cmk_lakebase.bind_database('app', 'appcfg')"
	  :                            "SELECT action FROM cmk_lakebase.bind_database('app', 'thirdcfg')";
	my $want =
	    $step eq 'unbind_database:after_keyring' ? ''
	  : $step eq 'bind_database:after_keyring'   ? 'appcfg'
	  :                                            $before;
	my ($prc, $pout, $perr) = $node->psql('postgres', "SET cmk_lakebase.test_crash_at = '$step'; $sql");
	isnt($prc, 0, "$step: the backend died at the step");
	ok($node->poll_query_until('postgres', 'SELECT true'), "$step: serving again after the crash restart");
	crash_node($node);
	start_after_crash($node);
	is(bound_to(), $want, "$step: binding is " . ($want eq '' ? 'none' : $want) . ' after the start');
	ok(!grep({ !-f "$_/keyring.json" } glob("$pgdata/cmk_lakebase/db/*")), "$step: no half-made database key directory");
	ok(app_intact(), "$step: app data intact");
	q1('app', "INSERT INTO ledger VALUES ((SELECT max(id) + 1 FROM ledger), '$step')");
}
ok(amcheck_ok('app'), 'amcheck clean on app after the crash steps');

############################################################ 5. rebind, unbind, new and dropped databases
q1('postgres', "SELECT action FROM cmk_lakebase.bind_database('app', 'appcfg')") unless bound_to() eq 'appcfg';
my $wrapped_before = JSON::PP::decode_json(slurp_file("$dbdir/keyring.json"))->{wrapped_kek};
my $km_sha = Digest::SHA->new(256)->addfile("$dbdir/keymap")->hexdigest;
is(q1('postgres', "SELECT action || '|' || key_id FROM cmk_lakebase.bind_database('app', 'thirdcfg')"),
	"rebind_database|$key_3", 'rebind app to a third CMK');
isnt(JSON::PP::decode_json(slurp_file("$dbdir/keyring.json"))->{wrapped_kek}, $wrapped_before, 'its KEK is wrapped anew');
is(Digest::SHA->new(256)->addfile("$dbdir/keymap")->hexdigest, $km_sha, 'the database key map is unchanged (same KEK)');
key_command('disable', $key_db);
is(q1('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'the old CMK disabled: the cluster is fine');
sleep($check_interval + 1);
is(db_state(), 'open', 'and app, now under the third CMK, stays open');
key_command('enable', $key_db);

q1('postgres', 'CREATE DATABASE newdb');
my $new_oid = q1('postgres', "SELECT oid FROM pg_database WHERE datname = 'newdb'");
ok(!-e "$pgdata/cmk_lakebase/db/$new_oid", 'a new database inherits the cluster key (no binding of its own)');

my $fp_app = fingerprints('app');
is(q1('postgres', "SELECT action FROM cmk_lakebase.unbind_database('app')"), 'unbind_database', 'unbind app');
ok(!-e $dbdir, "app's key directory is gone");
is(fingerprints('app'), $fp_app, 'DEKs unchanged by the unbinding');
ok(app_intact(), 'app data intact after unbinding');
$node->restart;
ok(app_intact(), 'and after a restart');

q1('postgres', "SELECT action FROM cmk_lakebase.bind_database('newdb', 'appcfg')");
ok(-f "$pgdata/cmk_lakebase/db/$new_oid/keyring.json", 'newdb bound');
q1('postgres', 'DROP DATABASE newdb');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cmk_lakebase.database_keys() WHERE database_oid = $new_oid"),
	'DROP DATABASE: the binding is forgotten');
ok(!-e "$pgdata/cmk_lakebase/db/$new_oid", "the dropped database's key directory is removed");

############################################################ 6. audit
my $audit = q1('postgres', q{
	SELECT string_agg(DISTINCT action || ':' || outcome, ',' ORDER BY action || ':' || outcome)
	FROM cmk_lakebase.audit_log
	WHERE action IN ('bind_database', 'rebind_database', 'unbind_database', 'db_kill_switch', 'db_unlock', 'db_forget')});
for my $want (qw(bind_database:ok rebind_database:ok unbind_database:ok db_kill_switch:revoked db_unlock:ok db_forget:ok))
{
	like($audit, qr/(^|,)\Q$want\E(,|$)/, "audit row $want");
}
is(q1('postgres', qq{
	SELECT count(*) FROM cmk_lakebase.audit_log
	WHERE action = 'db_kill_switch' AND key_id = '$key_db' AND detail ~ 'database $app_oid'}), '1',
	'the kill switch row names the key and the database');
is(q1('postgres', qq{
	SELECT count(*) > 0 FROM cmk_lakebase.audit_log
	WHERE action = 'bind_database' AND actor IS NOT NULL AND key_config = 'appcfg' AND key_id = '$key_db'}), 't',
	'bind rows carry actor, configuration and key');

$node->stop;
done_testing();
