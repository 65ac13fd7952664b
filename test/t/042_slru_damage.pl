# Damage to an SLRU page (issue 18, item 8), measured: SLRU pages carry no checksum, in
# plaintext PostgreSQL as here. One flipped bit in pg_xact changes one transaction's
# status in a plaintext cluster; in an encrypted one XTS garbles the whole 16-byte
# cipher block, i.e. the statuses of 64 consecutive transactions (2 bits each), and
# their rows vanish without an error, as in plaintext for the one. This test measures
# both on the same workload (400 single-row transactions, one bit flipped under the
# 200th) and asserts the bound the README states: the encrypted cluster loses rows of
# that one 64-transaction window only, never elsewhere; the plaintext one loses exactly
# the one row. The printed counts are the numbers the README quotes.

use strict;
use warnings;

use Fcntl qw(O_RDWR SEEK_SET);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CmkTest;

my $n = 400;

sub flip_bit
{
	my ($file, $offset, $bit) = @_;
	sysopen(my $fh, $file, O_RDWR) or die "open $file: $!";
	binmode $fh;
	sysseek($fh, $offset, SEEK_SET) or die;
	sysread($fh, my $b, 1) == 1 or die "short read of $file";
	$b = chr(ord($b) ^ (1 << $bit));
	sysseek($fh, $offset, SEEK_SET) or die;
	syswrite($fh, $b) == 1 or die "write $file: $!";
	close $fh or die;
}

# Returns (first xid of the run, the damaged xid, sorted list of xids whose row is gone).
sub damage_and_count
{
	my ($node) = @_;
	$node->append_conf('postgresql.conf', "autovacuum = off\n");
	$node->start;
	$node->safe_psql('postgres', 'CREATE TABLE t (id int, x bigint)');
	my $x0 = $node->safe_psql('postgres', 'SELECT txid_current()');
	# one transaction per row (psql in autocommit); the table is not read before the
	# damage, so no hint bit spares a lookup in pg_xact
	$node->safe_psql('postgres', join('', map { "INSERT INTO t VALUES ($_, txid_current());\n" } 1 .. $n));
	my $x1 = $node->safe_psql('postgres', 'SELECT txid_current()');
	is($x1, $x0 + $n + 1, 'the rows were written by consecutive transactions') or return;
	$node->stop;    # the shutdown checkpoint writes pg_xact

	my $victim = $x0 + 200;
	# 4 statuses per byte, 2 bits each: turn "committed" (01) into "in progress" (00)
	flip_bit($node->data_dir . '/pg_xact/0000', int($victim / 4), 2 * ($victim % 4));
	$node->start;
	my %seen = map { $_ => 1 } split /\n/, $node->safe_psql('postgres', 'SELECT x FROM t');
	$node->stop;
	my @lost = grep { !$seen{$_} } ($x0 + 1 .. $x0 + $n);
	return ($x0, $victim, @lost);
}

my $enc = new_encrypted_node('slru_enc', plain => 0);
my ($x0, $victim, @lost) = damage_and_count($enc);
my $first = int($victim / 64) * 64;    # the 16-byte XTS block holding the victim's status
print "# encrypted: one bit flipped under xid $victim: " . scalar(@lost) . " of $n rows lost\n";
cmp_ok(scalar @lost, '>=', 1, 'encrypted: the damage is not silently absorbed (rows of the block are gone)');
cmp_ok(scalar @lost, '<=', 64, 'encrypted: at most the 64 transactions of one cipher block lose their rows');
is_deeply([ grep { $_ < $first || $_ > $first + 63 } @lost ], [],
	"encrypted: every lost row belongs to the block's window (xids $first..@{[$first + 63]})");

my $plain = new_encrypted_node('slru_plain', plain => 1);
($x0, $victim, @lost) = damage_and_count($plain);
print "# plaintext: one bit flipped under xid $victim: " . scalar(@lost) . " of $n rows lost\n";
is_deeply(\@lost, [$victim], 'plaintext control: exactly the damaged transaction\'s row is lost');

done_testing();
