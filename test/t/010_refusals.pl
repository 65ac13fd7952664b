# Refusals: an encrypted cluster whose keys are missing, wrong, disabled or damaged
# must not start (and must say why), a damaged data page must be reported as a
# checksum failure and never returned as rows, a copy of the cluster must be useless
# without the key store, and the module must refuse the configurations it cannot
# serve. Every refusal is followed by the repair and a successful start with the data
# intact, so each case proves that exactly the damaged piece was the cause.

use strict;
use warnings;

use File::Basename ();
use File::Copy qw(copy);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $marker = 'CMKREFUSALMARKER' . int(rand(1_000_000_000));

# From the first FATAL or PANIC line to the end of the attempt's log: the error with
# its DETAIL and HINT lines.
sub fatal_block
{
	my ($log) = @_;
	return $log =~ /^(.*\b(?:FATAL|PANIC):.*)\z/ms ? $1 : '';
}

my $node = new_encrypted_node('main');
my $datadir = $node->data_dir;
my $store   = $node->{cmk_key_store};
my $key_id  = $node->{cmk_key_id};
my $cmkdir  = "$datadir/cmk_lakebase";

$node->start;
$node->safe_psql(
	'postgres', qq{
	CREATE TABLE t (id int PRIMARY KEY, v text);
	INSERT INTO t SELECT g, '$marker-' || g FROM generate_series(1, 1000) g;
	CHECKPOINT;
});
my $expected = $node->safe_psql('postgres',
	"SELECT count(*), sum(id), sum(length(v)) FROM t WHERE v LIKE '$marker-%'");
is($expected, '1000|500500|' . (1000 * (length($marker) + 1) + 2893),
	'baseline data present');

sub data_intact
{
	my ($n, $label) = @_;
	my ($rc, $out, $err) = $n->psql('postgres',
		"SELECT count(*), sum(id), sum(length(v)) FROM t WHERE v LIKE '$marker-%'");
	is($out, $expected, "$label: data intact") or diag($err);
}

# Stop the node, damage something, check that the start is refused with a message
# matching every regexp in @$patterns (searched from the first FATAL/PANIC on), then
# repair and check that the node starts with its data.
sub refused_then_repaired
{
	my (%c) = @_;
	my $label = $c{label};
	$node->stop if node_is_running($node);
	$c{damage}->();
	my ($started, $log) = try_start($node);
	ok(!$started, "$label: server refuses to start");
	ok(!node_is_running($node), "$label: no postmaster left running");
	my $block = fatal_block($log);
	isnt($block, '', "$label: log has a FATAL or PANIC") or diag($log);
	like($block, $_, "$label: message matches $_") for @{ $c{patterns} };
	unlike($block, qr/\Q$marker\E/, "$label: message shows no data");
	$node->stop('immediate', fail_ok => 1) if $started;
	$c{repair}->();
	($started, $log) = try_start($node);
	ok($started, "$label: repaired, server starts") or diag($log);
	data_intact($node, "$label (repaired)") if $started;
}

# (a) keyring missing
refused_then_repaired(
	label    => 'keyring missing',
	damage   => sub { rename("$cmkdir/keyring.json", "$cmkdir/keyring.json.away") or die $! },
	repair   => sub { rename("$cmkdir/keyring.json.away", "$cmkdir/keyring.json") or die $! },
	patterns => [ qr/cmk_lakebase/, qr/keyring/i ]);

# (b) wrong key material under the right key id: the key file of another key, its id
# rewritten, replaces ours, so the KMS call succeeds but the KEK does not unwrap.
my $other_id  = create_key($store);
my $keyfile   = "$store/$key_id.key";
my $otherfile = "$store/$other_id.key";
ok(-f $keyfile,   'key file of the cluster key is in the key store');
ok(-f $otherfile, 'key file of the other key is in the key store');
refused_then_repaired(
	label  => 'wrong key material',
	damage => sub {
		rename($keyfile, "$keyfile.orig") or die $!;
		my $text = slurp_file($otherfile);
		$text =~ s/\Q$other_id\E/$key_id/g;
		open(my $fh, '>', $keyfile) or die $!;
		print $fh $text;
		close $fh;
		chmod 0600, $keyfile;
	},
	repair   => sub { rename("$keyfile.orig", $keyfile) or die $! },
	patterns => [ qr/unwrap/i, qr/\Q$key_id\E/ ]);

# (c) key disabled at the provider
refused_then_repaired(
	label  => 'key disabled',
	damage => sub {
		my ($rc, $out, $err) =
		  pg_cmk('key', 'disable', $key_id, '--key-store', $store);
		is($rc, 0, 'pg_cmk key disable succeeds');
	},
	repair => sub {
		my ($rc, $out, $err) =
		  pg_cmk('key', 'enable', $key_id, '--key-store', $store);
		is($rc, 0, 'pg_cmk key enable succeeds');
	},
	patterns => [ qr/disabled/i, qr/\Q$key_id\E/ ]);

# (d) key map truncated to half its size
my $keymap = "$cmkdir/keymap";
refused_then_repaired(
	label  => 'key map truncated',
	damage => sub {
		copy($keymap, "$keymap.orig") or die $!;
		my $size = -s $keymap;
		ok($size > 0, "key map is not empty ($size bytes)");
		truncate($keymap, int($size / 2)) or die $!;
	},
	repair => sub {
		rename("$keymap.orig", $keymap) or die $!;
	},
	patterns => [qr/key ?map|no key/i]);

# (e) one data page flipped on disk: a checksum failure, never rows of garbage
$node->safe_psql(
	'postgres', qq{
	CREATE TABLE flipme (id int, v text);
	INSERT INTO flipme SELECT g, '$marker-flip-' || g FROM generate_series(1, 100) g;
	CHECKPOINT;
});
my $relpath = $node->safe_psql('postgres', "SELECT pg_relation_filepath('flipme')");
$node->stop;
my $relfile = "$datadir/$relpath";
is(-s $relfile, 8192, 'flipme is one block');
flip_bytes($relfile, 4096, 32);
$node->start;
my ($rc, $out, $err) = $node->psql('postgres', 'SELECT * FROM flipme');
isnt($rc, 0, 'reading the flipped page fails');
is($out, '', 'no rows returned from the flipped page');
like($err, qr/invalid page in block 0 of relation/,
	'the failure is reported as an invalid page (checksum)');
($rc, $out, $err) = $node->psql('postgres', 'SELECT count(*) FROM flipme');
isnt($rc, 0, 'counting rows of the flipped page fails too');
data_intact($node, 'other table after page flip');
$node->safe_psql('postgres', 'DROP TABLE flipme');

# (f) the cluster copied elsewhere: useless without the key store, fine with it
$node->stop;
my $copy = PostgreSQL::Test::Cluster->new('copy');
my $copydir = $copy->data_dir;
system_or_bail('cp', '-a', $datadir, $copydir);
$copy->append_conf('postgresql.conf', 'port = ' . $copy->port);
rename($store, "$store.away") or die "rename $store: $!";
my ($started, $log) = try_start($copy);
ok(!$started, 'copy without the key store: refuses to start');
isnt(fatal_block($log), '', 'copy without the key store: FATAL in log') or diag($log);
my @hits = scan_for_markers($copydir, $marker);
is_deeply(\@hits, [], 'copy of the cluster holds no plaintext marker')
  or diag(join("\n", @hits));
# Control: the same scan does find the marker where it is in plaintext (the server
# log, which has log_statement = all), so the empty result above means something.
my @control = scan_for_markers(File::Basename::dirname($node->logfile), $marker);
ok(scalar(@control) > 0, 'scan control: the marker is found in the plaintext server log');
$copy->stop('immediate', fail_ok => 1) if $started;
rename("$store.away", $store) or die "rename $store.away: $!";
($started, $log) = try_start($copy);
ok($started, 'copy with the key store back: starts') or diag($log);
data_intact($copy, 'copy') if $started;
$copy->stop if $started;

# (g) an encrypted cluster started without the module: it must not serve ciphertext
# as data (the startup process cannot read the encrypted WAL and gives up)
$node->append_conf('postgresql.conf', "shared_preload_libraries = ''");
($started, $log) = try_start($node);
ok(!$started, 'without the module: encrypted cluster refuses to start');
like($log, qr/\b(PANIC|FATAL):/, 'without the module: PANIC or FATAL in log');
if ($started)
{
	($rc, $out, $err) = $node->psql('postgres', 'SELECT v FROM t LIMIT 5');
	unlike($out, qr/./, 'without the module: no rows served') ;
	$node->stop('immediate', fail_ok => 1);
}
$node->adjust_conf('postgresql.conf', 'shared_preload_libraries', "'cmk_lakebase'");
($started, $log) = try_start($node);
ok($started, 'module back: encrypted cluster starts') or diag($log);
data_intact($node, 'after start attempt without module') if $started;

# (h) a plaintext cluster without the module preloaded: CREATE EXTENSION refuses
my $plain = new_plain_node('plain');
$plain->start;
($rc, $out, $err) = $plain->psql('postgres', 'CREATE EXTENSION cmk_lakebase');
isnt($rc, 0, 'plaintext cluster: CREATE EXTENSION cmk_lakebase fails');
like($err, qr/shared_preload_libraries/,
	'plaintext cluster: the error points at shared_preload_libraries');
is($plain->safe_psql('postgres',
		"SELECT count(*) FROM pg_extension WHERE extname = 'cmk_lakebase'"),
	'0', 'plaintext cluster: extension not created');
is($plain->safe_psql('postgres', 'SELECT 1'), '1',
	'plaintext cluster: server still serves after the refusal');

# (i) the module preloaded into a plaintext cluster (no keyring): refuses to start
# rather than "decrypting" plaintext
$plain->stop;
$plain->append_conf('postgresql.conf', "shared_preload_libraries = 'cmk_lakebase'");
($started, $log) = try_start($plain);
ok(!$started, 'plaintext cluster with the module preloaded: refuses to start');
like(fatal_block($log), qr/keyring/i,
	'plaintext cluster with the module preloaded: FATAL names the keyring')
  or diag($log);
$plain->stop('immediate', fail_ok => 1) if $started;
$plain->adjust_conf('postgresql.conf', 'shared_preload_libraries', "''");
($started, $log) = try_start($plain);
ok($started, 'plaintext cluster without the module: starts again') or diag($log);

# The local provider's options at configuration time: one line naming the field, and
# nothing created (no cluster, no key store, no key).
{
	my $base = PostgreSQL::Test::Utils::tempdir('local_opts');
	for my $case ([ 'timout_ms=5000', 2, qr/\Apg_cmk: error: timout_ms: unknown option of the local provider/ ],
		[ 'timeout_ms=5', 1, qr/\Apg_cmk: error: timeout_ms: "5" is not a number of milliseconds from 100 to 600000\n\z/ ])
	{
		my ($opt, $want_rc, $want_err) = @$case;
		my ($rc, $out, $err) = pg_cmk('initdb', '-D', "$base/data", '--key-store', "$base/keys",
			'--kms-option', $opt, '--', '-U', 'postgres');
		is($rc, $want_rc, "local provider, --kms-option $opt: pg_cmk initdb exits $want_rc");
		like($err, $want_err, "... naming the field");
		ok(!-e "$base/data" && !-e "$base/keys", '... and creates nothing');
	}
}

$node->stop;
done_testing();
