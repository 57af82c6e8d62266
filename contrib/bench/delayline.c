/*
 * delayline: a wire with propagation delay, between two interfaces of the "wan" namespace.
 *
 * tc netem is not in this kernel, so the benchmark and the tests put this between tunA and
 * tunB: every Ethernet frame that arrives on interface A leaves on interface B, and the other
 * way round, no sooner than --delay-us after it arrived (plus or minus --jitter-us, uniform).
 * Loss is not its job: nftables drops at the receiving tunnel host (tests/netns.py).
 *
 * The frames travel through AF_PACKET sockets with PACKET_VNET_HDR, so a frame whose checksum
 * the sender left to the "hardware" (CHECKSUM_PARTIAL, normal on veth) leaves with the same
 * instruction instead of a wrong checksum, and a GSO frame leaves as the same GSO frame.
 *
 * Guarantees:
 *   - never early: a frame's due time is taken from CLOCK_MONOTONIC when this process read it
 *     (which is at or after its arrival) plus the delay, and it is sent only once the clock
 *     has passed that time; how late it went out is measured and reported;
 *   - no duplicates: the sockets ignore their own outgoing frames (PACKET_IGNORE_OUTGOING, and
 *     the packet type checked again), and each frame is sent once or counted as dropped;
 *   - order kept within a direction: with jitter, a frame is never due before the one ahead
 *     of it (a FIFO link whose delay varies), so jitter never reorders;
 *   - bounded: at most --queue frames wait per direction; one more is dropped and counted.
 *
 * Protocol with the caller (the benchmark, tests/test_wan.py), on standard output:
 *   out "ready"        both sockets bound: frames are being carried
 *   SIGTERM, SIGINT    stop (frames still held are counted as dropped)
 *   out {json}         one line of counters per direction, last, then exit 0
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23  /* <linux/if_packet.h> from 4.20 */
#endif

#define SLOT 2048               /* bytes per held frame: virtio header + 1514-byte frame, spare */
#define SOCKET_BUFFER (8 << 20) /* SO_RCVBUFFORCE, SO_SNDBUFFORCE: bursts wait here, not lost */
#define LATE_BUCKETS 64         /* lateness histogram: 64 buckets of 10 us, the last open */
#define LATE_BUCKET_NS 10000
#define NS 1000000000LL

struct frame {
	int64_t due_ns;
	uint32_t len;  /* bytes in data, the virtio header included */
	unsigned char data[SLOT];
};

struct direction {
	const char *name;  /* "a_to_b" */
	int in, out;       /* sockets on the arriving and the leaving interface */
	struct frame *ring;
	size_t head, count;
	int64_t last_due_ns;
	uint64_t forwarded, queue_full, too_big, send_errors, max_queued;
	uint64_t late_hist[LATE_BUCKETS];
	int64_t late_max_ns;
};

static volatile sig_atomic_t stop;
static size_t queue_limit = 4096;
static int64_t delay_ns, jitter_ns;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static void on_signal(int signum) {
	(void)signum;
	stop = 1;
}

static int64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * NS + ts.tv_nsec;
}

static uint64_t next_random(void) {  /* xorshift64*: cheap, and enough for jitter */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1Dull;
}

static int64_t hold_ns(void) {
	if (jitter_ns == 0)
		return delay_ns;
	int64_t offset = (int64_t)(next_random() % (uint64_t)(2 * jitter_ns + 1)) - jitter_ns;
	return delay_ns + offset > 0 ? delay_ns + offset : 0;
}

static void die(const char *what) {
	perror(what);
	exit(2);
}

static int open_port(const char *ifname) {
	/* Protocol 0 until bound: an ETH_P_ALL socket would hear every interface meanwhile. */
	int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket(AF_PACKET)");
	int on = 1, size = SOCKET_BUFFER;
	if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &on, sizeof on) < 0)
		die("PACKET_VNET_HDR");
	if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &on, sizeof on) < 0)
		die("PACKET_IGNORE_OUTGOING");
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
		die("SO_RCVBUFFORCE");
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
		die("SO_SNDBUFFORCE");
	struct sockaddr_ll address = {
		.sll_family = AF_PACKET,
		.sll_protocol = htons(ETH_P_ALL),
		.sll_ifindex = (int)if_nametoindex(ifname),
	};
	if (address.sll_ifindex == 0) {
		fprintf(stderr, "delayline: no interface %s\n", ifname);
		exit(2);
	}
	if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0)
		die("bind(AF_PACKET)");
	return fd;
}

/* Read every frame waiting on d->in and queue it, due after the delay. */
static void receive(struct direction *d) {
	for (;;) {
		struct frame *slot = &d->ring[(d->head + d->count) % queue_limit];
		static struct frame spare;  /* where a frame goes that has no room: read, dropped */
		int full = d->count == queue_limit;
		struct frame *into = full ? &spare : slot;
		struct sockaddr_ll from;
		socklen_t from_len = sizeof from;
		ssize_t n = recvfrom(d->in, into->data, SLOT, MSG_TRUNC, (struct sockaddr *)&from,
		                     &from_len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				perror("delayline: recvfrom");
			return;
		}
		if (from.sll_pkttype == PACKET_OUTGOING)
			continue;  /* our own, sent on this interface: already carried */
		if (n > SLOT) {
			d->too_big++;
			continue;
		}
		if (full) {
			d->queue_full++;
			continue;
		}
		int64_t due = now_ns() + hold_ns();
		if (due < d->last_due_ns)
			due = d->last_due_ns;  /* never ahead of the frame before it */
		d->last_due_ns = due;
		slot->due_ns = due;
		slot->len = (uint32_t)n;
		d->count++;
		if (d->count > d->max_queued)
			d->max_queued = d->count;
	}
}

/* Send every queued frame that is due; the due time of the next one, or -1. */
static int64_t transmit(struct direction *d) {
	while (d->count) {
		struct frame *f = &d->ring[d->head];
		int64_t now = now_ns();
		if (f->due_ns > now)
			return f->due_ns;
		if (send(d->out, f->data, f->len, 0) < 0) {
			if (errno == EINTR)
				continue;
			d->send_errors++;
		} else {
			d->forwarded++;
			int64_t late = now - f->due_ns;
			size_t bucket = (size_t)(late / LATE_BUCKET_NS);
			d->late_hist[bucket < LATE_BUCKETS ? bucket : LATE_BUCKETS - 1]++;
			if (late > d->late_max_ns)
				d->late_max_ns = late;
		}
		d->head = (d->head + 1) % queue_limit;
		d->count--;
	}
	return -1;
}

/* The lateness below which 99% of the forwarded frames went out, to a bucket's width. */
static double late_p99_us(const struct direction *d) {
	uint64_t seen = 0;
	for (size_t i = 0; i < LATE_BUCKETS; i++) {
		seen += d->late_hist[i];
		if (seen * 100 >= d->forwarded * 99)
			return (double)((i + 1) * LATE_BUCKET_NS) / 1e3;
	}
	return (double)d->late_max_ns / 1e3;
}

static void report(const struct direction *d, const char *tail) {
	printf("\"%s\": {\"forwarded\": %" PRIu64 ", \"queue_full\": %" PRIu64
	       ", \"too_big\": %" PRIu64 ", \"send_errors\": %" PRIu64 ", \"held_at_exit\": %zu"
	       ", \"max_queued\": %" PRIu64 ", \"late_p99_us\": %.0f, \"late_max_us\": %.1f}%s",
	       d->name, d->forwarded, d->queue_full, d->too_big, d->send_errors, d->count,
	       d->max_queued, d->forwarded ? late_p99_us(d) : 0.0, (double)d->late_max_ns / 1e3,
	       tail);
}

static void usage(void) {
	fprintf(stderr,
	        "usage: delayline --a IFNAME --b IFNAME [--delay-us N] [--jitter-us N] "
	        "[--queue FRAMES] [--seed N]\n");
	exit(2);
}

int main(int argc, char **argv) {
	const char *if_a = NULL, *if_b = NULL;
	static const struct option options[] = {
		{"a", required_argument, NULL, 'a'},      {"b", required_argument, NULL, 'b'},
		{"delay-us", required_argument, NULL, 'd'}, {"jitter-us", required_argument, NULL, 'j'},
		{"queue", required_argument, NULL, 'q'},  {"seed", required_argument, NULL, 's'},
		{NULL, 0, NULL, 0},
	};
	int opt;
	while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (opt) {
		case 'a': if_a = optarg; break;
		case 'b': if_b = optarg; break;
		case 'd': delay_ns = strtoll(optarg, NULL, 10) * 1000; break;
		case 'j': jitter_ns = strtoll(optarg, NULL, 10) * 1000; break;
		case 'q': queue_limit = strtoull(optarg, NULL, 10); break;
		case 's': rng_state = strtoull(optarg, NULL, 10) | 1; break;
		default: usage();
		}
	}
	if (!if_a || !if_b || delay_ns < 0 || jitter_ns < 0 || queue_limit == 0)
		usage();
	prctl(PR_SET_TIMERSLACK, 1UL);  /* wake when asked, not up to 50 us later */

	struct direction dirs[2] = {
		{.name = "a_to_b", .in = open_port(if_a)},
		{.name = "b_to_a", .in = open_port(if_b)},
	};
	dirs[0].out = dirs[1].in;
	dirs[1].out = dirs[0].in;
	for (int i = 0; i < 2; i++) {
		dirs[i].ring = calloc(queue_limit, sizeof(struct frame));  /* touched only as used */
		if (!dirs[i].ring)
			die("calloc");
	}

	sigset_t blocked, waiting;
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGINT);
	sigprocmask(SIG_BLOCK, &blocked, &waiting);  /* delivered only inside ppoll: no race */
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	printf("ready\n");
	fflush(stdout);

	struct pollfd fds[2] = {{.fd = dirs[0].in, .events = POLLIN},
	                        {.fd = dirs[1].in, .events = POLLIN}};
	while (!stop) {
		int64_t next = -1;
		for (int i = 0; i < 2; i++) {
			int64_t due = transmit(&dirs[i]);
			if (due >= 0 && (next < 0 || due < next))
				next = due;
		}
		struct timespec timeout, *wait = NULL;
		if (next >= 0) {
			int64_t left = next - now_ns();
			if (left < 0)
				left = 0;
			timeout = (struct timespec){.tv_sec = left / NS, .tv_nsec = left % NS};
			wait = &timeout;
		}
		if (ppoll(fds, 2, wait, &waiting) < 0) {
			if (errno == EINTR)
				continue;
			die("ppoll");
		}
		for (int i = 0; i < 2; i++)
			if (fds[i].revents & POLLIN)
				receive(&dirs[i]);
	}
	printf("{");
	report(&dirs[0], ", ");
	report(&dirs[1], "}\n");
	return 0;
}
