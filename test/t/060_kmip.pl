# The KMIP key provider end to end against a real KMIP server: the PyKMIP server
# (Debian python3-pykmip, /usr/bin/python3, test/kms/pykmip_server.py) on 127.0.0.1
# with a throwaway CA, server certificate and clientAuth client certificate made by
# test/kms/kmip_certs.sh. Keys are created, activated and revoked with PyKMIP's own
# client library (test/kms/kmip_key.py), so our TTLV codec talks to independent code
# in both directions.
#
#  1. Bad configurations fail in pg_cmk initdb with one line naming the field, before
#     any network call (missing CA file), or refusing an untrusted server (wrong CA).
#  2. initdb --provider kmip, start, write, restart: data intact; pg_cmk status ok.
#  3. PyKMIP server stopped: pg_cmk status "unavailable" (exit 4), not "revoked"; the
#     running server keeps serving, its watchdog says unavailable; server back: ok.
#  4. Key revoked in PyKMIP: pg_cmk status "revoked" (exit 3), cmk_status() and the
#     watchdog classify it revoked, the cluster goes down, and will not start again.
#  5. Kill latency with cmk_lakebase.check_interval = 1s: revoke -> postmaster exit,
#     measured over 3 runs (min/median/max printed), each < check_interval + 3 s.
use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $python = '/usr/bin/python3';
plan skip_all => 'the KMIP tests need /usr/bin/python3 with python3-pykmip'
  unless -x $python && system($python, '-c', 'import kmip.services.server') == 0;

my $kms_dir = abs_path(dirname(__FILE__) . '/../kms');
my $certs   = PostgreSQL::Test::Utils::tempdir('kmip_certs');
my $srvdir  = PostgreSQL::Test::Utils::tempdir('kmip_server');
system('bash', "$kms_dir/kmip_certs.sh", $certs) == 0
  or BAIL_OUT('could not make the KMIP test certificates');

# --- the PyKMIP server -----------------------------------------------------------

my ($kmip_pid, $kmip_port);

sub start_kmip
{
	my ($port) = @_;
	unlink "$srvdir/port";
	my @cmd = ($python, "$kms_dir/pykmip_server.py", '--dir', $srvdir, '--certs', $certs,
		'--lifetime', '900', ($port ? ('--port', $port) : ()));
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDOUT, '>>', "$srvdir/stdout.log") or die;
		open(STDERR, '>&', \*STDOUT) or die;
		exec(@cmd) or die "exec: $!";
	}
	my $deadline = time + 60;
	while (time < $deadline && !-s "$srvdir/port")
	{
		BAIL_OUT('the PyKMIP server died at start: ' . slurp_file("$srvdir/stdout.log"))
		  if waitpid($pid, WNOHANG) == $pid;
		sleep 0.1;
	}
	BAIL_OUT('the PyKMIP server did not start in 60 s') unless -s "$srvdir/port";
	chomp(my $p = slurp_file("$srvdir/port"));
	($kmip_pid, $kmip_port) = ($pid, $p);
	note "PyKMIP server pid $pid on 127.0.0.1:$p";
	return;
}

sub stop_kmip
{
	return unless $kmip_pid;
	kill 'TERM', $kmip_pid;
	my $deadline = time + 30;
	while (time < $deadline)
	{
		last if waitpid($kmip_pid, WNOHANG) == $kmip_pid;
		sleep 0.1;
	}
	if (kill 0, $kmip_pid)
	{
		kill 'KILL', $kmip_pid;
		waitpid($kmip_pid, 0);
	}
	$kmip_pid = undef;
	return;
}

END { stop_kmip() }

# PyKMIP's own client: create|activate|revoke|state ...
sub kmip_key
{
	my @args = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $python, "$kms_dir/kmip_key.py", '--port', $kmip_port, '--certs', $certs, @args ],
		'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout(60))
	  or die "kmip_key.py @args failed: $err";
	chomp $out;
	return $out;
}

sub new_active_key
{
	my $uid = kmip_key('create');
	kmip_key('activate', $uid);
	is(kmip_key('state', $uid), 'ACTIVE', "KMIP key $uid is Active");
	return $uid;
}

sub kmip_options
{
	my (%over) = @_;
	my %o = (
		host        => '127.0.0.1',
		port        => $kmip_port,
		ca_file     => "$certs/ca.pem",
		client_cert => "$certs/client.pem",
		client_key  => "$certs/client.key",
		timeout_ms  => 5000,
		%over);
	return map { "$_=$o{$_}" } grep { defined $o{$_} } sort keys %o;
}

# An encrypted node under the KMIP key $uid, started.
sub kmip_node
{
	my ($name, $uid, $check_interval) = @_;
	return new_encrypted_node($name, provider => 'kmip', key_id => $uid, kms_options => [ kmip_options() ],
		check_interval => $check_interval, start => 1);
}

# True while the process exists and is not a zombie.
sub alive
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh>;
	close $fh;
	$stat =~ s/^.*\)\s+//s;
	return (split /\s+/, $stat)[0] ne 'Z';
}

sub status_of
{
	my ($node) = @_;
	my ($rc, $out, $err) = pg_cmk('status', '-D', $node->data_dir);
	my ($state) = $out =~ /^key_state: (.*)$/m;
	return ($rc, $state // '', $err);
}

start_kmip();

# --- 1. configuration errors --------------------------------------------------------

{
	my $uid = new_active_key();
	my $dir = PostgreSQL::Test::Utils::tempdir('kmip_bad') . '/data';
	my $conns_before = () = slurp_file("$srvdir/server.log") =~ /Receiving incoming connection/g;
	my ($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'kmip', '--key-id', $uid,
		map({ ('--kms-option', $_) } kmip_options(ca_file => "$certs/no_such_ca.pem")),
		'--', '-A', 'trust');
	isnt($rc, 0, 'initdb with a missing CA file fails');
	my @lines = grep { /\S/ } split /\n/, $err;
	is(scalar(@lines), 1, 'the error is one line');
	like($err, qr/ca_file/, 'the error names the field ca_file');
	like($err, qr/no_such_ca\.pem/, 'the error names the missing file');
	ok(!-e "$dir/PG_VERSION", 'no cluster was created');
	my $conns_after = () = slurp_file("$srvdir/server.log") =~ /Receiving incoming connection/g;
	is($conns_after, $conns_before, 'the configuration error came before any network call');

	($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'kmip', '--key-id', $uid,
		map({ ('--kms-option', $_) } kmip_options(host => undef)),
		'--', '-A', 'trust');
	isnt($rc, 0, 'initdb without host fails');
	like($err, qr/host/, 'the error names the field host');

	($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'kmip', '--key-id', $uid,
		map({ ('--kms-option', $_) } kmip_options(ca_file => "$certs/other_ca.pem")),
		'--', '-A', 'trust');
	isnt($rc, 0, 'initdb against a server our CA did not sign fails');
	like($err, qr/not trusted/, 'the error says the server certificate is not trusted');
	ok(!-e "$dir/PG_VERSION", 'no cluster was created');

	($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'kmip', '--key-id', 'no-such-key',
		map({ ('--kms-option', $_) } kmip_options()), '--', '-A', 'trust');
	isnt($rc, 0, 'initdb with an unknown key id fails');
	like($err, qr/Item Not Found/, 'the error says what the KMIP server answered');

	# A host name: resolved in a child process within the connect timeout (pg_cmk has
	# one thread; src/core/kms/kmip.cpp, addresses()).
	my $t0 = time;
	($rc, $out, $err) = pg_cmk('initdb', '-D', $dir, '--provider', 'kmip', '--key-id', $uid,
		map({ ('--kms-option', $_) } kmip_options(host => 'no-such-host.invalid', timeout_ms => 2000)),
		'--', '-A', 'trust');
	my $took = time - $t0;
	isnt($rc, 0, 'initdb with a host name that does not resolve fails');
	like($err, qr/could not resolve host no-such-host\.invalid: /, 'the error names the host that did not resolve');
	cmp_ok($took, '<', 15, "... within the timeout (${took}s)");
	ok(!-e "$dir/PG_VERSION", 'no cluster was created');
	my $named = "$dir.localhost";
	($rc, $out, $err) = pg_cmk('initdb', '-D', $named, '--provider', 'kmip', '--key-id', $uid,
		map({ ('--kms-option', $_) } kmip_options(host => 'localhost')), '--', '-A', 'trust', '-N');
	is($rc, 0, 'initdb through host localhost (resolved in a child process) succeeds') or diag($err);
	($rc, $out, $err) = pg_cmk('status', '-D', $named);
	is($rc, 0, 'pg_cmk status through host localhost: ok') or diag($out, $err);
}

# --- 2..4. one cluster through its life -------------------------------------------------

my $uid  = new_active_key();
my $node = kmip_node('kmip_main', $uid, '1h');
$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
$node->safe_psql('postgres',
	"CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g");
$node->restart;
is($node->safe_psql('postgres', 'SELECT count(*), sum(id) FROM t'),
	'5000|12502500', 'data intact after a restart through the KMIP provider');
is($node->safe_psql('postgres', 'SELECT provider, key_id, key_state FROM cmk_lakebase.cmk_status()'),
	"kmip|$uid|ok", 'cmk_status(): kmip provider, key ok');
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok', 'watchdog: ok');
my ($rc, $state) = status_of($node);
is($rc, 0, 'pg_cmk status exits 0 with an Active key');
like($state, qr/^ok \(Active/, 'pg_cmk status: ok (Active)');

# 3. The KMIP server goes away: an outage, not a revocation.
stop_kmip();
($rc, $state) = status_of($node);
is($rc, 4, 'pg_cmk status exits 4 while the KMIP server is down');
like($state, qr/^unavailable/, 'pg_cmk status: unavailable');
unlike($state, qr/revoked/, 'not revoked');
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'),
	'unavailable', 'watchdog: unavailable');
$node->safe_psql('postgres', "INSERT INTO t VALUES (5001, 'during the outage')");
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '5001', 'the running server keeps serving');
ok(node_is_running($node), 'the cluster is up during the outage');
start_kmip($kmip_port);
is($node->safe_psql('postgres', 'SELECT cmk_lakebase.check_key_now()'), 'ok',
	'watchdog: ok again once the KMIP server is back');

# 4. Revoke the key at the KMIP server.
kmip_key('revoke', $uid);
is(kmip_key('state', $uid), 'DEACTIVATED', 'PyKMIP: the key is Deactivated');
($rc, $state) = status_of($node);
is($rc, 3, 'pg_cmk status exits 3 for a revoked key');
like($state, qr/^revoked \(Deactivated/, 'pg_cmk status: revoked (Deactivated)');
is($node->safe_psql('postgres', 'SELECT key_state FROM cmk_lakebase.cmk_status()'),
	'revoked', 'cmk_status(): revoked');
my $pm = postmaster_pid($node);
my ($ret, $stdout, $stderr) =
  $node->psql('postgres', 'SELECT cmk_lakebase.check_key_now()', on_error_stop => 0);
ok($stdout eq 'revoked' || $ret != 0,
	"check_key_now(): revoked, or the session died with the cluster (answer: '$stdout')");
my $deadline = time + 30;
sleep 0.05 while alive($pm) && time < $deadline;
ok(!alive($pm), 'the watchdog shut the cluster down');
$node->{_pid} = undef;
like(slurp_file($node->logfile), qr/key "\Q$uid\E" of provider "kmip" is revoked: .*Deactivated/,
	'the server log names the key, the provider and the KMIP state');
my ($started, $log) = try_start($node);
ok(!$started, 'restart refused while the key is revoked');
like($log, qr/FATAL:.*\Q$uid\E/, 'a FATAL naming the key');
like($log, qr/Permission Denied|Deactivated|revoked/, 'the FATAL says what the KMIP server answered');
note "restart refusal: $_" for grep { /FATAL|DETAIL|HINT/ } split /\n/, $log;

# --- 5. kill latency with check_interval = 1s -----------------------------------------

my @lat;
for my $run (1 .. 3)
{
	my $k = new_active_key();
	my $n = kmip_node("kmip_kill$run", $k, '1s');
	$n->safe_psql('postgres', 'CREATE TABLE w (i int); INSERT INTO w SELECT generate_series(1, 1000)');
	my $pid = postmaster_pid($n);
	my $t0  = time;
	kmip_key('revoke', $k);
	my $t1 = time;    # the key is revoked at the server from here on
	$deadline = $t1 + 30;
	sleep 0.01 while alive($pid) && time < $deadline;
	my $t2 = time;
	ok(!alive($pid), "run $run: revoking the key in PyKMIP killed the postmaster");
	my $latency = $t2 - $t1;
	push @lat, $latency;
	diag(sprintf("run %d: kill latency %.3f s from the Revoke's completion (%.3f s from starting the "
		  . "revoke command)", $run, $latency, $t2 - $t0));
	cmp_ok($latency, '<', 1 + 3, "run $run: latency below check_interval + 3 s");
	$n->{_pid} = undef;
	my ($ok, $l) = try_start($n);
	ok(!$ok, "run $run: restart refused");
}
my @s = sort { $a <=> $b } @lat;
diag(sprintf("KMIP kill latency over %d runs: min %.3f s, median %.3f s, max %.3f s",
	scalar(@s), $s[0], $s[ int(@s / 2) ], $s[-1]));

stop_kmip();
done_testing();
