# Tools: the stock PostgreSQL tools work on an encrypted, stopped cluster through
# "pg_cmk exec" (pg_waldump decodes records, pg_checksums verifies every page,
# pg_controldata and pg_resetwal -n read the control data), while the same tools run
# without the layer cannot read the encrypted files. Also the pg_cmk command line
# itself: status and its exit codes (3 when the key is revoked), key commands, help,
# version and usage errors.

use strict;
use warnings;

use Cwd ();
use JSON::PP ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $marker = 'CMKTOOLSMARKER' . int(rand(1_000_000_000));

my $node    = new_encrypted_node('tools');
my $datadir = $node->data_dir;
my $store   = $node->{cmk_key_store};
my $key_id  = $node->{cmk_key_id};

$node->start;
# Separate transactions: under wal_level = minimal, rows inserted in the transaction
# that created the table would skip WAL, and pg_waldump should find heap records.
$node->safe_psql('postgres', 'CREATE TABLE t (id int PRIMARY KEY, v text)');
$node->safe_psql('postgres',
	"INSERT INTO t SELECT g, '$marker-' || g FROM generate_series(1, 5000) g");
$node->safe_psql('postgres', 'CHECKPOINT');
$node->safe_psql('postgres', "UPDATE t SET v = v || '-u' WHERE id % 10 = 0");
$node->stop;

sub write_file
{
	my ($path, $data) = @_;
	open(my $fh, '>', $path) or die "$path: $!";
	binmode $fh;
	print $fh $data;
	close $fh or die "$path: $!";
}

# Runs a command (no stdin); returns (rc, stdout, stderr), all logged.
sub run3
{
	my @cmd = @_;
	my ($out, $err) = ('', '');
	print "# running: @cmd\n";
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(180));
	my $rc = ($? & 127) ? 128 + ($? & 127) : $? >> 8;
	print "# rc=$rc\n# stdout (first 2000 chars):\n"
	  . substr($out, 0, 2000)
	  . "\n# stderr:\n$err\n";
	return ($rc, $out, $err);
}

# --- pg_controldata
my ($rc, $out, $err) = pg_cmk('exec', '-D', $datadir, '--', 'pg_controldata', $datadir);
is($rc, 0, 'pg_cmk exec pg_controldata: exit 0');
like($out, qr/^Database cluster state:\s+shut down$/m,
	'pg_controldata: cluster shut down cleanly');
like($out, qr/^Data page checksum version:\s+1$/m,
	'pg_controldata: data checksums are on (pg_cmk initdb enables them)');
my ($checkpoint) = $out =~ /^Latest checkpoint location:\s+(\S+)$/m;
ok(defined $checkpoint, 'pg_controldata: latest checkpoint location found');

# --- pg_waldump
my @segs = wal_segments($datadir);
ok(@segs >= 1, 'pg_wal has segments');
my $seg = "$datadir/pg_wal/$segs[0]";
# End at the shutdown checkpoint: without -e, pg_waldump reports the end of WAL as an
# error and exits 1 even on a plaintext cluster.
($rc, $out, $err) =
  pg_cmk('exec', '-D', $datadir, '--', 'pg_waldump', '-e', $checkpoint // '0/0', $seg);
is($rc, 0, 'pg_cmk exec pg_waldump: exit 0');
like($out, qr/^rmgr: Heap\s/m, 'pg_waldump through the layer decodes heap records');
like($out, qr/^rmgr: XLOG\s/m, 'pg_waldump through the layer decodes XLOG records');
my $nrec = () = $out =~ /^rmgr: /mg;
cmp_ok($nrec, '>', 1000, "pg_waldump decodes many records ($nrec)");

($rc, $out, $err) = run3('pg_waldump', '-e', $checkpoint // '0/0', $seg);
isnt($rc, 0, 'plain pg_waldump cannot read the encrypted segment');
unlike($out, qr/^rmgr: /m, 'plain pg_waldump decodes no record');

# --- pg_checksums
($rc, $out, $err) =
  pg_cmk('exec', '-D', $datadir, '--', 'pg_checksums', '--check', '-D', $datadir);
is($rc, 0, 'pg_cmk exec pg_checksums --check: exit 0');
like($out, qr/^Bad checksums:\s+0$/m, 'pg_checksums through the layer: no bad checksum');
my ($blocks) = $out =~ /^Blocks scanned:\s+(\d+)$/m;
cmp_ok($blocks // 0, '>', 100, 'pg_checksums scanned the cluster\'s blocks');

($rc, $out, $err) = run3('pg_checksums', '--check', '-D', $datadir);
isnt($rc, 0, 'plain pg_checksums on the encrypted cluster fails');
my ($bad) = $out =~ /^Bad checksums:\s+(\d+)$/m;
cmp_ok($bad // 0, '>', 0,
	'plain pg_checksums sees ciphertext: checksums do not match');

# --- pg_resetwal (dry run)
($rc, $out, $err) = pg_cmk('exec', '-D', $datadir, '--', 'pg_resetwal', '-n', $datadir);
is($rc, 0, 'pg_cmk exec pg_resetwal -n: exit 0');
like($out, qr/^Current pg_control values:/m, 'pg_resetwal -n shows pg_control values');
like($out, qr/^Values to be changed:/m, 'pg_resetwal -n shows what it would change');

# --- exit status of the tool is passed through
($rc, $out, $err) = pg_cmk('exec', '-D', $datadir, '--', 'sh', '-c', 'exit 7');
is($rc, 7, 'pg_cmk exec returns the tool\'s exit status');
($rc, $out, $err) =
  pg_cmk('exec', '-D', $datadir, '--', 'sh', '-c', 'echo "$CMK_LAKEBASE_PGDATA"');
is($rc, 0, 'pg_cmk exec runs a command found in PATH');
is($out, Cwd::abs_path($datadir) . "\n",
	'pg_cmk exec sets CMK_LAKEBASE_PGDATA to the absolute data directory');

# --- status
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 0, 'pg_cmk status: exit 0 with the key usable');
like($out, qr/local/, 'pg_cmk status shows the provider');
like($out, qr/\Q$key_id\E/, 'pg_cmk status shows the key id');
like($out, qr/\bok\b/, 'pg_cmk status shows the key state ok');
($rc, $out, $err) = pg_cmk('status', '-D', $datadir, '--json');
is($rc, 0, 'pg_cmk status --json: exit 0');
my $json = eval { JSON::PP::decode_json($out) };
ok(ref $json eq 'HASH', 'pg_cmk status --json prints a JSON object') or diag($@);
if (ref $json eq 'HASH')
{
	is($json->{provider}, 'local',   'status JSON: provider');
	is($json->{key_id},   $key_id,   'status JSON: key_id');
	is($json->{key_state}, 'ok',     'status JSON: key_state');
	like($json->{kek_fingerprint} // '', qr/^[0-9a-f]{32}$/,
		'status JSON: kek_fingerprint is 32 hex digits');
	# (the JSON names it "deks"; cmk_status() names it dek_count)
	cmp_ok($json->{dek_count} // $json->{deks} // 0, '>', 0, 'status JSON: number of DEKs > 0');
}

# --- key commands
($rc, $out, $err) = pg_cmk('key', 'list', '--key-store', $store);
is($rc, 0, 'pg_cmk key list: exit 0');
like($out, qr/\Q$key_id\E/, 'pg_cmk key list shows the cluster key');
($rc, $out, $err) = pg_cmk('key', 'show', $key_id, '--key-store', $store);
is($rc, 0, 'pg_cmk key show: exit 0');
like($out, qr/enabled/, 'pg_cmk key show: key enabled');
($rc, $out, $err) = pg_cmk('key', 'show', 'cmk-doesnotexist', '--key-store', $store);
isnt($rc, 0, 'pg_cmk key show of an unknown key fails');

($rc, $out, $err) = pg_cmk('key', 'disable', $key_id, '--key-store', $store);
is($rc, 0, 'pg_cmk key disable: exit 0');
($rc, $out, $err) = pg_cmk('key', 'show', $key_id, '--key-store', $store);
like($out, qr/disabled/, 'pg_cmk key show: key disabled');
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 3, 'pg_cmk status with the key disabled: exit 3');
like($out . $err, qr/revoked/, 'pg_cmk status with the key disabled: says revoked');
# pg_control is plaintext (read before the layer could run in the server), so
# pg_controldata alone need not fail; a tool that reads relation files must.
($rc, $out, $err) =
  pg_cmk('exec', '-D', $datadir, '--', 'pg_checksums', '--check', '-D', $datadir);
is($rc, 1, 'pg_cmk exec with the key disabled: the layer refuses, exit 1');
like($err, qr/cmk_lakebase: .*disabled/s, 'pg_cmk exec with the key disabled: says why');
unlike($out, qr/^Bad checksums:/m, 'pg_cmk exec with the key disabled: tool did not run on');
($rc, $out, $err) = pg_cmk('key', 'enable', $key_id, '--key-store', $store);
is($rc, 0, 'pg_cmk key enable: exit 0');
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 0, 'pg_cmk status with the key enabled again: exit 0');

# --- damaged key files: exit 5, said to be damaged, never "revoked" (issue 18)
my $kdir = "$datadir/cmk_lakebase";
my $keyring_good = slurp_file("$kdir/keyring.json");
(my $keyring_bad = $keyring_good) =~ s{("wrapped_kek": "[A-Za-z0-9+/]{10})([A-Za-z0-9+/])}{$1 . ($2 eq 'A' ? 'B' : 'A')}e;
isnt($keyring_bad, $keyring_good, 'one character of the wrapped KEK changed');
write_file("$kdir/keyring.json", $keyring_bad);
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 5, 'pg_cmk status with a damaged wrapped KEK: exit 5');
like($err, qr/^pg_cmk: error: .*wrapped key-encryption key is damaged/m, 'it says the wrapped KEK is damaged');
unlike($out . $err, qr/revoked/, 'and not that the key is revoked');
my ($started, $slog) = try_start($node);
ok(!$started, 'the server refuses to start with the damaged wrapped KEK');
like($slog, qr/FATAL:  cmk_lakebase: cannot load the keyring.*\n.*DETAIL:  .*wrapped key-encryption key is damaged/,
	'its FATAL says the keyring is damaged (DETAIL: the wrapped KEK)');
$node->{_pid} = undef;
write_file("$kdir/keyring.json", $keyring_good);

# A truncated key map (a record cut in half is a torn append, ignored): the server
# refuses to start (data files without a key); so does status, exit 5.
my $keymap_good = slurp_file("$kdir/keymap");
write_file("$kdir/keymap", substr($keymap_good, 0, int(length($keymap_good) / 2)));
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 5, 'pg_cmk status with a truncated key map: exit 5');
like($err, qr/^pg_cmk: error: the key map is damaged or truncated: \d+ data file\(s\) have no data encryption key/m,
	'it says which damage');
($started, $slog) = try_start($node);
ok(!$started, 'the server refuses to start with the truncated key map too');
like($slog, qr/data file\(s\) have no data encryption key in the key map/, 'for the same reason');
$node->{_pid} = undef;
write_file("$kdir/keymap", $keymap_good);
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 0, 'key files restored: pg_cmk status exit 0');

# A key id that is not UTF-8 text: refused, and never echoed raw.
($rc, $out, $err) = pg_cmk('config', 'create', '-D', $datadir, 'badtext', '--provider', 'vault',
	'--key-id', "k\xff\xfe", '--kms-option', 'address=http://127.0.0.1:1');
isnt($rc, 0, 'a key id with invalid UTF-8 is refused');
like($err, qr/key_id: "k\\xff\\xfe" is not valid UTF-8 text/, 'the message escapes it');
unlike($err, qr/\xff/, 'no raw invalid byte in the message');

# --- help, version, usage errors
($rc, $out, $err) = pg_cmk('--help');
is($rc, 0, 'pg_cmk --help: exit 0');
like($out, qr/$_/, "pg_cmk --help mentions $_") for qw(initdb exec status key);
($rc, $out, $err) = pg_cmk('--version');
is($rc, 0, 'pg_cmk --version: exit 0');
like($out, qr/\d+\.\d+\.\d+/, 'pg_cmk --version prints a version');
for my $cmd (qw(initdb exec status key bench-cipher))
{
	($rc, $out, $err) = pg_cmk($cmd, '--help');
	is($rc, 0, "pg_cmk $cmd --help: exit 0");
	like($out, qr/\Q$cmd\E/, "pg_cmk $cmd --help describes $cmd");
}

sub usage_error
{
	my ($expect_rc, $label, @args) = @_;
	my ($rc, $out, $err) = pg_cmk(@args);
	is($rc, $expect_rc, "$label: exit $expect_rc");
	# one line, plus at most PostgreSQL's usual 'Try "... --help"' pointer
	like($err, qr/\Apg_cmk: error: [^\n]+\n(Try "pg_cmk[^\n]*--help"[^\n]*\n)?\z/,
		"$label: one-line error");
}
usage_error(2, 'no command');
usage_error(2, 'unknown command',       'frobnicate');
usage_error(2, 'unknown option',        'status', '-D', $datadir, '--frobnicate');
usage_error(2, 'status without -D',     'status');
usage_error(2, 'exec without a tool',   'exec', '-D', $datadir);
usage_error(2, 'initdb without -D',     'initdb');
usage_error(2, 'unknown key subcommand', 'key', 'frobnicate', '--key-store', $store);
usage_error(1, 'status of a missing directory', 'status', '-D', "$datadir.nonexistent");

# --- page cipher benchmark
($rc, $out, $err) = pg_cmk('bench-cipher', '--seconds', '1');
is($rc, 0, 'pg_cmk bench-cipher: exit 0');
like($out, qr/^page_cipher_mb_per_s [0-9.]+ [0-9.]+$/m, 'bench-cipher prints its line');

# --- nothing above damaged the cluster
$node->start;
is($node->safe_psql('postgres',
		"SELECT count(*), sum(id) FROM t WHERE v LIKE '$marker-%'"),
	'5000|12502500', 'cluster starts after the tools with its data intact');

# --- a damaged configs.json (issue 18): rotate_kek() checks it before its first write,
# the start notices it and names the file; no SQL on damaged input leaves a cluster
# that does not start.
$node->safe_psql('postgres', 'CREATE EXTENSION cmk_lakebase');
$node->safe_psql('postgres',
	"SELECT cmk_lakebase.create_key_config('second', 'local', '$key_id', jsonb_build_object('key_store', '$store'))");
my $configs_good = slurp_file("$kdir/configs.json");
my $gen_before = $node->safe_psql('postgres', 'SELECT kek_generation FROM cmk_lakebase.cmk_status()');
$keyring_good = slurp_file("$kdir/keyring.json");
write_file("$kdir/configs.json", substr($configs_good, 0, int(length($configs_good) / 2)));
my ($prc, $pout, $perr) = $node->psql('postgres', 'SELECT cmk_lakebase.rotate_kek()');
isnt($prc, 0, 'rotate_kek() with a damaged configs.json fails');
like($perr, qr/configs\.json|damaged/, 'and says why');
is(slurp_file("$kdir/keyring.json"), $keyring_good, 'keyring.json was not written');
$node->stop;
($started, $slog) = try_start($node);
ok(!$started, 'a start with a damaged configs.json is refused');
like($slog, qr/FATAL:  cmk_lakebase: the key configurations file ".*configs\.json" is damaged/,
	'its FATAL names the file');
$node->{_pid} = undef;
($rc, $out, $err) = pg_cmk('status', '-D', $datadir);
is($rc, 5, 'pg_cmk status with a damaged configs.json: exit 5');
write_file("$kdir/configs.json", $configs_good);
($started, $slog) = try_start($node);
ok($started, 'configs.json restored: starts');
$node->safe_psql('postgres', 'SELECT cmk_lakebase.rotate_kek()');
is($node->safe_psql('postgres', 'SELECT kek_generation FROM cmk_lakebase.cmk_status()'), $gen_before + 1,
	'and rotate_kek() runs');
is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE v LIKE '$marker-%'"), '5000', 'data intact');

# --- DROP TABLE shreds the table's DEK in the key map by the next checkpoint (issue 18)
$node->safe_psql('postgres', 'CREATE TABLE doomed AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000) g');
$node->safe_psql('postgres', 'CHECKPOINT');
my $doomed = $node->safe_psql('postgres', "SELECT pg_relation_filepath('doomed')");
# The ADD record: identity, then the sealed DEK's length and bytes.
my $map = slurp_file("$kdir/keymap");
my $found = ($map =~ /\Q$doomed\E(?![_.0-9])/g);
ok($found, "the key map holds an entry for $doomed");
my $sealed_doomed = substr($map, pos($map), 42);
is(length($sealed_doomed), 42, 'its sealed DEK read from the key map file');
$node->safe_psql('postgres', 'DROP TABLE doomed');
$node->safe_psql('postgres', 'CHECKPOINT');
$map = slurp_file("$kdir/keymap");
is(index($map, $sealed_doomed), -1, 'after DROP TABLE and CHECKPOINT the sealed DEK is gone from the key map file');
isnt(index($map, $doomed), -1, 'a tombstone of the identity stays (for backups taken meanwhile)');
is($node->safe_psql('postgres', "SELECT count(*) FROM t"), '5000', 'other tables unaffected');
$node->restart;
is($node->safe_psql('postgres', "SELECT count(*) FROM t"), '5000', 'and readable after a restart');
$node->stop;

done_testing();
