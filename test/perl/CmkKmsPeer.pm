# CmkKmsPeer: loopback KMS test servers (test/kms/*.py) for the TAP tests of the HTTP
# key providers. Nodes encrypted through such a provider come from the one factory,
# CmkTest::new_encrypted_node (provider, key_id and kms_options).
#
#   my $peer = start_kms_peer('vault_server.py', '--token-file', $f, '--key', 'k1');
#   kms_control($peer, action => 'deny', name => 'k1');
#   my $node = new_encrypted_node('main', provider => 'vault', key_id => 'k1',
#                                 kms_options => { addr => $peer->{url}, token_file => $f });
#
# The servers bind 127.0.0.1 on a free port, stop when this test process goes away
# (parent-death check) or after a hard lifetime, and are killed by stop_kms_peer or at
# the end of the test.

package CmkKmsPeer;

use strict;
use warnings;

use Carp;
use Cwd qw(abs_path);
use Exporter 'import';
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run ();
use JSON::PP ();
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes ();

our @EXPORT = qw(start_kms_peer stop_kms_peer kms_control aws_control aws_env_keys_only write_secret_file
  python_has_modules wait_for_postmaster_exit);

my $kms_dir = abs_path(dirname(__FILE__) . '/../kms');
my @peers;

=pod

=over

=item python_has_modules(@modules)

True if /usr/bin/python3 imports every module given.

=cut

sub python_has_modules
{
	my @mods = @_;
	return 0 unless -x '/usr/bin/python3';
	my $rc = system('/usr/bin/python3', '-c', 'import ' . join(',', @mods));
	return $rc == 0;
}

=item write_secret_file($path, $text)

Writes $text (plus a newline) to $path with mode 0600; returns $path.

=cut

sub write_secret_file
{
	my ($path, $text) = @_;
	open(my $fh, '>', $path) or die "open $path: $!";
	print $fh "$text\n";
	close $fh;
	chmod 0600, $path or die "chmod $path: $!";
	return $path;
}

=item start_kms_peer($script, @args)

Starts test/kms/$script with /usr/bin/python3; returns { url, port, dir, harness }.
Bails out if it does not listen within 20 s.

=cut

sub start_kms_peer
{
	my ($script, @args) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir('kms');
	my $port_file = "$dir/port";
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ '/usr/bin/python3', "$kms_dir/$script", '--port-file', $port_file,
			'--lifetime', '1200', @args ],
		'<', \undef, '>', \$out, '2>', \$err);
	my $port;
	for (1 .. 200)
	{
		if (-s $port_file)
		{
			$port = PostgreSQL::Test::Utils::slurp_file($port_file);
			chomp $port;
			last;
		}
		IPC::Run::pump_nb($h);
		select(undef, undef, undef, 0.1);
	}
	BAIL_OUT("$script did not start: $err") unless $port;
	# With --tls-cert the server speaks https only; its (self-signed) certificate is
	# the CA the control requests trust.
	my %a = @args;
	my $scheme = $a{'--tls-cert'} ? 'https' : 'http';
	my $peer = { url => "$scheme://127.0.0.1:$port", port => $port, dir => $dir, harness => $h,
		script => $script, err => \$err, ca => $a{'--tls-cert'} };
	push @peers, $peer;
	note "$script listening on $peer->{url}";
	return $peer;
}

sub stop_kms_peer
{
	my ($peer) = @_;
	return unless $peer->{harness};
	$peer->{harness}->kill_kill(grace => 2);
	delete $peer->{harness};
}

END
{
	# Reaping a peer killed by SIGTERM sets $? to 15: keep the test's own exit status.
	my $rc = $?;
	stop_kms_peer($_) for @peers;
	$? = $rc;
}

=item kms_control($peer, %request)

POSTs the request as JSON to the peer's control endpoint; returns the decoded answer.
Dies on anything but 200.

=cut

sub kms_control
{
	my ($peer, %req) = @_;
	my $json = JSON::PP::encode_json(\%req);
	# curl rather than HTTP::Tiny: Debian's perl has no TLS module by default.
	my @curl = ('curl', '-sS', '--max-time', '10', '-X', 'POST', '-H', 'Content-Type: application/json',
		'--data-binary', $json, '-w', '\n%{http_code}');
	push @curl, '--cacert', $peer->{ca} if $peer->{ca};
	my ($out, $err) = ('', '');
	IPC::Run::run([ @curl, "$peer->{url}/__control" ], '<', \undef, '>', \$out, '2>', \$err);
	my ($body, $code) = $out =~ /\A(.*)\n(\d+)\z/s;
	BAIL_OUT("kms control $json failed: " . ($code // '-') . " $err $out") unless ($code // 0) == 200;
	note "kms control: $json";
	return JSON::PP::decode_json($body);
}

=item aws_control($url, $op, \%body)

The AWS peer's (aws_kms_server.py) control endpoint: GET $url/_test/stats for 'stats',
else POST $url/_test/$op with the body as JSON; returns the decoded answer, dies on
anything but 2xx.

=cut

sub aws_control
{
	my ($url, $op, $body) = @_;
	my $http = HTTP::Tiny->new(timeout => 30);
	my $r =
	  $op eq 'stats'
	  ? $http->get("$url/_test/stats")
	  : $http->post("$url/_test/$op",
		{ content => JSON::PP::encode_json($body // {}), headers => { 'Content-Type' => 'application/json' } });
	die "control $op: $r->{status} $r->{content}" unless $r->{success};
	return JSON::PP::decode_json($r->{content});
}

=item aws_env_keys_only($dir, $akid, $secret)

Leaves the AWS credential chain nothing but AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
($akid, $secret): shared files point into $dir where there are none, the other AWS_*
variables are removed, IMDS is disabled.

=cut

sub aws_env_keys_only
{
	my ($dir, $akid, $secret) = @_;
	$ENV{$_} = "$dir/absent" for qw(AWS_SHARED_CREDENTIALS_FILE AWS_CONFIG_FILE);
	delete $ENV{$_}
	  for qw(AWS_PROFILE AWS_SESSION_TOKEN AWS_WEB_IDENTITY_TOKEN_FILE AWS_ROLE_ARN AWS_REGION
	  AWS_DEFAULT_REGION AWS_EC2_METADATA_SERVICE_ENDPOINT);
	$ENV{AWS_EC2_METADATA_DISABLED} = 'true';
	$ENV{AWS_ACCESS_KEY_ID}         = $akid;
	$ENV{AWS_SECRET_ACCESS_KEY}     = $secret;
}

=item wait_for_postmaster_exit($node, $seconds)

Waits until the node's postmaster is gone; returns the seconds it took (fractional,
measured from the call), or undef.

=cut

sub wait_for_postmaster_exit
{
	my ($node, $limit) = @_;
	my $pidfile = $node->data_dir . '/postmaster.pid';
	my $t0 = Time::HiRes::time();
	my $pid;
	if (open(my $fh, '<', $pidfile)) { $pid = <$fh>; chomp $pid; close $fh; }
	return 0 unless $pid;
	while (Time::HiRes::time() - $t0 <= $limit)
	{
		return Time::HiRes::time() - $t0 unless kill(0, $pid);
		select(undef, undef, undef, 0.02);
	}
	return undef;
}

=back

=cut

1;
