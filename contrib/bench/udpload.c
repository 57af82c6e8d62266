/*
 * udpload: the benchmark's UDP load generator and sink, cheap enough not to be measured.
 *
 * One process per application host. It binds one UDP socket (the application's address and
 * port) and may both send on it (a sender thread, the main one) and receive on it (a sink
 * thread), so that datagrams leave from the very address the tunnel sends back to.
 *
 * Every datagram starts with a 16-byte header, in host byte order (sender and sink share one
 * machine), and is padded with zeros to the requested size: sizes given here are UDP payload
 * sizes, so "64 B" is 64 bytes of payload (92 bytes of IPv4 packet), and the least is 16.
 *
 *     uint32 seq      0, 1, 2, ... per sender, burst datagrams included
 *     uint32 kind     MAGIC | 0 for the steady stream, MAGIC | 1 for the burst
 *     int64  send_ns  CLOCK_MONOTONIC when the datagram was handed to the kernel
 *
 * CLOCK_MONOTONIC is one clock for every network namespace, so receive time minus send time
 * is the one-way latency. The sink takes the receive time from the kernel's timestamp of the
 * datagram's arrival on the socket (SO_TIMESTAMPNS, CLOCK_REALTIME, moved to CLOCK_MONOTONIC
 * by the offset between the two clocks, which NTP slews alike), so its own scheduling delay
 * is not counted against the tunnel.
 *
 * Sending modes (all sends batched with sendmmsg):
 *   --rate R      paced: datagram i is due at start + i/R; whatever is due goes out in one
 *                 batch, and the sender sleeps at least --tick-us between batches (so at high
 *                 rates it sends a few per wake-up instead of one per system call)
 *   (no --rate)   unpaced: batches of 64 back to back, as fast as the kernel takes them
 *   --window W    closed loop: at most W datagrams in flight; the sink acknowledges the count
 *                 it has received over a Unix datagram socket at a filesystem path (--ack-to
 *                 on the sink, --ack-listen on the sender), which does not cross the tunnel
 *                 and works across network namespaces. Capacity so measured is one-way.
 *   --burst N@T   N extra datagrams at once, T seconds after the start
 *   --sockets N   send from N sockets in turn (the first bound to --bind, the others to
 *                 its address and ephemeral ports): N sources, as for flow mode
 * The sink records every datagram (seq, kind, send and receive time) in memory and writes
 * them at the end, raw, to --records; the benchmark computes the statistics.
 *
 * Protocol with the benchmark, on standard input and output:
 *   out "ready"            socket bound, sink running: the start time may be sent
 *   in  "go START_NS"      CLOCK_MONOTONIC time at which to start sending
 *   out "sent"             the sender has finished
 *   SIGUSR1                drain: the sink stops once no datagram came for --drain-idle-ms,
 *                          or --drain-max-ms after the signal at the latest
 *   SIGTERM, SIGINT        stop now
 *   out {json}             one line of totals, last, then exit 0
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x55440000u  /* "UD" in the kind word: tells our datagrams from stray ones */
#define KIND_STEADY 0u
#define KIND_BURST 1u
#define HEADER_SIZE 16     /* seq, kind, send_ns */
#define BATCH 64           /* datagrams per sendmmsg/recvmmsg: amortises the system call */
#define RECEIVE_COPY 64    /* bytes of each datagram the sink copies: the header and spare */
#define POLL_MS 100        /* the sink's receive timeout: how often it looks at its flags */
#define STALL_MS 100       /* closed loop: no acknowledgement this long means loss */
#define ACK_WAIT_US 5000   /* the longest an acknowledgement waits for room at the sender */
#define NAP_NS 2000000     /* the sink's pause after a busy wake-up, unless it acknowledges */
#define NAP_MIN 16         /* datagrams in one wake-up that make it a busy one */
#define NS 1000000000LL

struct header {
	uint32_t seq;
	uint32_t kind;
	int64_t send_ns;
};

struct record {  /* what the sink keeps per datagram; the benchmark reads this layout */
	int64_t send_ns;
	int64_t recv_ns;
	uint32_t seq;
	uint32_t kind;
};

static struct {
	struct sockaddr_in bind, dest;
	int have_dest, receive;
	size_t size;
	double rate, duration;
	long long count;
	int window;
	long long burst_count;
	double burst_at;
	long tick_us;
	const char *ack_listen, *ack_to, *records;
	long drain_idle_ms, drain_max_ms;
	int buffer;
	int sockets;
} opt = {.sockets = 1, .size = 200, .tick_us = 200, .drain_idle_ms = 300, .drain_max_ms = 5000,
	 .buffer = 32 << 20};

static int udp_fd = -1;
#define MAX_SOCKETS 1024
static int send_fds[MAX_SOCKETS];  /* --sockets: send_fds[0] is udp_fd */
static int next_socket;
static atomic_int stop_now, drain_requested;

/* Sender state, read by main after the sender finishes. */
static uint64_t sent, sent_burst, send_errors, stalls;
static int64_t send_start_ns, send_end_ns, send_cpu_ns;

/* Sink state, read by main after the sink thread is joined. */
static struct record *records;
static size_t n_records, cap_records;
static uint64_t received, received_bytes, malformed, untimed, ack_failures;
static int64_t recv_cpu_ns;

static void die(const char *what)
{
	fprintf(stderr, "udpload: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: udpload --bind ADDR:PORT [--receive [--records FILE] [--ack-to PATH]]\n"
		"               [--dest ADDR:PORT --size BYTES (--duration S | --count N)\n"
		"                [--rate R [--tick-us US] [--burst N@T] | --window W --ack-listen PATH]\n"
		"                [--sockets N]]\n"
		"               [--buffer BYTES] [--drain-idle-ms MS] [--drain-max-ms MS]\n");
	exit(2);
}

static int64_t clock_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static int64_t mono_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

static void sleep_until(int64_t when)
{
	struct timespec ts = {.tv_sec = when / NS, .tv_nsec = when % NS};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		if (atomic_load(&stop_now))
			return;
}

static void parse_address(const char *text, struct sockaddr_in *out)
{
	char host[64];
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof host)
		usage();
	memcpy(host, text, colon - text);
	host[colon - text] = '\0';
	memset(out, 0, sizeof *out);
	out->sin_family = AF_INET;
	out->sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &out->sin_addr) != 1)
		usage();
}

/* As large as asked, past net.core.[rw]mem_max as root: the load tools must never be the
 * bottleneck, nor drop anything themselves. */
static void set_buffer(int fd, int force, int plain, int bytes)
{
	if (setsockopt(fd, SOL_SOCKET, force, &bytes, sizeof bytes) < 0 &&
	    setsockopt(fd, SOL_SOCKET, plain, &bytes, sizeof bytes) < 0)
		die("setsockopt buffer");
}

static void on_signal(int signum)
{
	if (signum == SIGUSR1)
		atomic_store(&drain_requested, 1);
	else
		atomic_store(&stop_now, 1);
}

/* ---------------------------------------------------------------- sender ---------------- */

static struct mmsghdr out_msgs[BATCH];
static struct iovec out_iov[BATCH];
static char *out_bufs;
static uint32_t next_seq;

static void setup_sender(void)
{
	out_bufs = calloc(BATCH, opt.size);
	if (!out_bufs)
		die("calloc");
	for (int i = 0; i < BATCH; i++) {
		out_iov[i].iov_base = out_bufs + (size_t)i * opt.size;
		out_iov[i].iov_len = opt.size;
		out_msgs[i].msg_hdr = (struct msghdr){
			.msg_name = &opt.dest, .msg_namelen = sizeof opt.dest,
			.msg_iov = &out_iov[i], .msg_iovlen = 1};
	}
}

/* Send n (<= BATCH) datagrams of one kind, all stamped now. A datagram the kernel refuses
 * (ENOBUFS, say) is counted as a send error and never counts as sent. */
static void send_batch(int n, uint32_t kind)
{
	int64_t now = mono_ns();
	for (int i = 0; i < n; i++) {
		struct header h = {.seq = next_seq++, .kind = MAGIC | kind, .send_ns = now};
		memcpy(out_iov[i].iov_base, &h, sizeof h);
	}
	int done = 0;
	while (done < n) {
		/* With several sockets, one datagram per call, each socket in turn. */
		int fd = opt.sockets > 1 ? send_fds[next_socket++ % opt.sockets] : udp_fd;
		int r = sendmmsg(fd, out_msgs + done, opt.sockets > 1 ? 1 : n - done, 0);
		if (r < 0) {
			if (errno == EINTR) {
				if (atomic_load(&stop_now))
					return;
				continue;
			}
			send_errors++;
			done++;  /* skip the one that failed */
			continue;
		}
		done += r;
		sent += r;
		if (kind == KIND_BURST)
			sent_burst += r;
	}
}

static void send_burst(void)
{
	for (long long left = opt.burst_count; left > 0 && !atomic_load(&stop_now);) {
		int n = left < BATCH ? (int)left : BATCH;
		send_batch(n, KIND_BURST);
		left -= n;
	}
}

static void run_paced(int64_t start)
{
	double period = NS / opt.rate;
	long long total = opt.count > 0 ? opt.count : (long long)ceil(opt.duration * opt.rate);
	int64_t tick = opt.tick_us * 1000LL;
	int64_t burst_time = start + (int64_t)(opt.burst_at * NS);
	int burst_pending = opt.burst_count > 0;
	long long done = 0;

	sleep_until(start);
	while (done < total && !atomic_load(&stop_now)) {
		int64_t now = mono_ns();
		if (burst_pending && now >= burst_time) {
			send_burst();
			burst_pending = 0;
		}
		long long due = (long long)((now - start) / period) + 1;
		if (due > total)
			due = total;
		while (done < due) {
			int n = due - done < BATCH ? (int)(due - done) : BATCH;
			send_batch(n, KIND_STEADY);
			done += n;
		}
		if (done >= total)
			break;
		int64_t wake = start + (int64_t)(done * period);
		if (wake < now + tick)
			wake = now + tick;
		if (burst_pending && burst_time < wake)
			wake = burst_time;
		sleep_until(wake);
	}
	if (burst_pending && !atomic_load(&stop_now))
		send_burst();  /* a burst set after the end still goes out */
}

static void run_unpaced(int64_t start)
{
	int64_t end = start + (int64_t)(opt.duration * NS);
	long long total = opt.count > 0 ? opt.count : -1;
	sleep_until(start);
	while (!atomic_load(&stop_now) && (total < 0 ? mono_ns() < end : (long long)sent < total)) {
		int n = BATCH;
		if (total >= 0 && total - (long long)sent < n)
			n = (int)(total - (long long)sent);
		send_batch(n, KIND_STEADY);
	}
}

/* Closed loop: keep at most W datagrams in flight. The sink reports how many it has
 * received; if the count stops moving for STALL_MS with the window full, what is in flight
 * is written off as lost (and paid back if it turns up late), so one loss cannot stop the
 * loop for good. */
static void run_window(int64_t start, int ack_fd)
{
	int64_t end = start + (int64_t)(opt.duration * NS);
	uint64_t acked = 0, written_off = 0;
	sleep_until(start);
	while (!atomic_load(&stop_now) && mono_ns() < end) {
		uint64_t value;
		while (recv(ack_fd, &value, sizeof value, MSG_DONTWAIT) == sizeof value) {
			if (value > acked) {
				uint64_t repaid = value - acked;
				written_off = written_off > repaid ? written_off - repaid : 0;
				acked = value;
			}
		}
		uint64_t in_flight = sent - acked - written_off;
		if (in_flight < (uint64_t)opt.window) {
			send_batch((int)(opt.window - in_flight), KIND_STEADY);
			continue;
		}
		struct pollfd p = {.fd = ack_fd, .events = POLLIN};
		int r = poll(&p, 1, STALL_MS);
		if (r == 0) {
			stalls++;
			written_off = sent - acked;
		}
	}
}

static int open_ack_listener(void)
{
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket AF_UNIX");
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	if (strlen(opt.ack_listen) >= sizeof sun.sun_path)
		usage();
	strcpy(sun.sun_path, opt.ack_listen);
	unlink(opt.ack_listen);
	if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
		die("bind ack socket");
	set_buffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, 1 << 20);
	return fd;
}

/* ---------------------------------------------------------------- sink ------------------ */

static void keep(const struct record *r)
{
	if (n_records == cap_records) {
		cap_records = cap_records ? cap_records * 2 : 1 << 16;
		records = realloc(records, cap_records * sizeof *records);
		if (!records)
			die("realloc");
	}
	records[n_records++] = *r;
}

static void *sink(void *unused)
{
	(void)unused;
	static char bufs[BATCH][RECEIVE_COPY];
	static char controls[BATCH][CMSG_SPACE(sizeof(struct timespec))];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	int ack_fd = -1;
	struct sockaddr_un ack_to = {.sun_family = AF_UNIX};
	int ack_pending = 0;

	if (opt.ack_to) {
		ack_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (ack_fd < 0 || strlen(opt.ack_to) >= sizeof ack_to.sun_path)
			die("ack socket");
		/* A full queue at the sender blocks the acknowledgement a moment (the sender
		 * reads them all the time), not until the next datagram, which will not come
		 * while the window is full; a sender that has finished stops it after this. */
		struct timeval ack_wait = {.tv_usec = ACK_WAIT_US};
		if (setsockopt(ack_fd, SOL_SOCKET, SO_SNDTIMEO, &ack_wait, sizeof ack_wait) < 0)
			die("SO_SNDTIMEO");
		strcpy(ack_to.sun_path, opt.ack_to);
	}
	int64_t last_rx = 0, drain_start = 0;
	int drained = 1;  /* the queue was found empty: wait for the next datagram */
	int got = 0;      /* datagrams taken since the sink last waited */
	for (;;) {
		if (atomic_load(&stop_now))
			break;
		if (atomic_load(&drain_requested)) {
			int64_t now = mono_ns();
			if (!drain_start)
				drain_start = now;
			int64_t quiet_since = last_rx > drain_start ? last_rx : drain_start;
			if (now - quiet_since > opt.drain_idle_ms * 1000000LL ||
			    now - drain_start > opt.drain_max_ms * 1000000LL)
				break;
		}
		for (int i = 0; i < BATCH; i++) {
			iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = RECEIVE_COPY};
			msgs[i].msg_hdr = (struct msghdr){
				.msg_iov = &iov[i], .msg_iovlen = 1,
				.msg_control = controls[i], .msg_controllen = sizeof controls[i]};
		}
		/* MSG_TRUNC: copy only the header, but learn each datagram's real length.
		 * Wait for the first datagram (the socket's timeout ends the wait), take what
		 * else is queued without waiting. */
		int flags = MSG_TRUNC | (drained ? MSG_WAITFORONE : MSG_DONTWAIT);
		int n = recvmmsg(udp_fd, msgs, BATCH, flags, NULL);
		if (n <= 0) {
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				die("recvmmsg");
			if (!drained && ack_fd < 0 && got >= NAP_MIN) {
				/* The queue is empty after a busy wake-up: nap, so that under
				 * load one wake-up takes many datagrams. Latency comes from the
				 * kernel's timestamps, so the nap does not count; the buffer holds
				 * far more than a nap's worth. At low rates there is no nap (it
				 * would be one more wake-up per datagram), and a closed loop
				 * needs its acknowledgements at once. */
				struct timespec nap = {.tv_nsec = NAP_NS};
				nanosleep(&nap, NULL);
			}
			drained = 1;
			got = 0;
		} else {
			drained = 0;
			got += n;
			int64_t mono = mono_ns();
			int64_t offset = clock_ns(CLOCK_REALTIME) - mono;
			for (int i = 0; i < n; i++) {
				struct msghdr *m = &msgs[i].msg_hdr;
				int64_t rx = mono;
				for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
					if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
						struct timespec ts;
						memcpy(&ts, CMSG_DATA(c), sizeof ts);
						rx = (int64_t)ts.tv_sec * NS + ts.tv_nsec - offset;
					}
				}
				if (rx == mono)
					untimed++;  /* no kernel timestamp: the time it was read */
				received++;
				received_bytes += msgs[i].msg_len;
				struct header h;
				memcpy(&h, bufs[i], sizeof h);
				if (msgs[i].msg_len < HEADER_SIZE || (h.kind & 0xffff0000u) != MAGIC) {
					malformed++;
					continue;
				}
				keep(&(struct record){.send_ns = h.send_ns, .recv_ns = rx, .seq = h.seq,
						       .kind = h.kind & 0xffffu});
			}
			last_rx = mono;
			ack_pending = ack_fd >= 0;
		}
		if (ack_pending) {
			uint64_t value = received;
			if (sendto(ack_fd, &value, sizeof value, 0,
				   (struct sockaddr *)&ack_to, sizeof ack_to) == sizeof value)
				ack_pending = 0;
			else
				ack_failures++;  /* the sender's queue stayed full: try again later */
		}
	}
	recv_cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID);
	if (ack_fd >= 0)
		close(ack_fd);
	return NULL;
}

static void write_records(void)
{
	FILE *f = fopen(opt.records, "wb");
	if (!f)
		die(opt.records);
	if (n_records && fwrite(records, sizeof *records, n_records, f) != n_records)
		die("fwrite");
	if (fclose(f))
		die("fclose");
}

/* ---------------------------------------------------------------- main ------------------ */

int main(int argc, char **argv)
{
	enum { BIND = 1, DEST, SIZE, RATE, DURATION, COUNT, WINDOW, BURST, TICK, ACK_LISTEN,
	       ACK_TO, RECEIVE, RECORDS, IDLE, MAX, BUFFER, SOCKETS };
	static const struct option longs[] = {
		{"bind", 1, 0, BIND}, {"dest", 1, 0, DEST}, {"size", 1, 0, SIZE},
		{"rate", 1, 0, RATE}, {"duration", 1, 0, DURATION}, {"count", 1, 0, COUNT},
		{"window", 1, 0, WINDOW}, {"burst", 1, 0, BURST}, {"tick-us", 1, 0, TICK},
		{"ack-listen", 1, 0, ACK_LISTEN}, {"ack-to", 1, 0, ACK_TO},
		{"receive", 0, 0, RECEIVE}, {"records", 1, 0, RECORDS},
		{"drain-idle-ms", 1, 0, IDLE}, {"drain-max-ms", 1, 0, MAX},
		{"buffer", 1, 0, BUFFER}, {"sockets", 1, 0, SOCKETS}, {0, 0, 0, 0}};
	int have_bind = 0, c;
	while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
		switch (c) {
		case BIND: parse_address(optarg, &opt.bind); have_bind = 1; break;
		case DEST: parse_address(optarg, &opt.dest); opt.have_dest = 1; break;
		case SIZE: opt.size = strtoul(optarg, NULL, 10); break;
		case RATE: opt.rate = strtod(optarg, NULL); break;
		case DURATION: opt.duration = strtod(optarg, NULL); break;
		case COUNT: opt.count = strtoll(optarg, NULL, 10); break;
		case WINDOW: opt.window = atoi(optarg); break;
		case BURST:
			if (sscanf(optarg, "%lld@%lf", &opt.burst_count, &opt.burst_at) != 2)
				usage();
			break;
		case TICK: opt.tick_us = atol(optarg); break;
		case ACK_LISTEN: opt.ack_listen = optarg; break;
		case ACK_TO: opt.ack_to = optarg; break;
		case RECEIVE: opt.receive = 1; break;
		case RECORDS: opt.records = optarg; break;
		case IDLE: opt.drain_idle_ms = atol(optarg); break;
		case MAX: opt.drain_max_ms = atol(optarg); break;
		case BUFFER: opt.buffer = atoi(optarg); break;
		case SOCKETS: opt.sockets = atoi(optarg); break;
		default: usage();
		}
	}
	if (!have_bind || optind != argc || opt.size < HEADER_SIZE || opt.size > 65507 ||
	    (!opt.have_dest && !opt.receive) ||
	    (opt.have_dest && opt.duration <= 0 && opt.count <= 0) ||
	    (opt.window > 0 && (!opt.ack_listen || opt.rate > 0)) || opt.window > BATCH ||
	    opt.sockets < 1 || opt.sockets > MAX_SOCKETS)
		usage();

	prctl(PR_SET_TIMERSLACK, 1UL);  /* wake on time: the default slack is 50 us */
	struct sigaction sa = {.sa_handler = on_signal};  /* no SA_RESTART: blocking calls end */
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (udp_fd < 0)
		die("socket");
	set_buffer(udp_fd, SO_RCVBUFFORCE, SO_RCVBUF, opt.buffer);
	set_buffer(udp_fd, SO_SNDBUFFORCE, SO_SNDBUF, opt.buffer);
	int on = 1;
	if (setsockopt(udp_fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) < 0)
		die("SO_TIMESTAMPNS");
	struct timeval poll_tv = {.tv_usec = POLL_MS * 1000};
	if (setsockopt(udp_fd, SOL_SOCKET, SO_RCVTIMEO, &poll_tv, sizeof poll_tv) < 0)
		die("SO_RCVTIMEO");
	if (bind(udp_fd, (struct sockaddr *)&opt.bind, sizeof opt.bind) < 0)
		die("bind");
	send_fds[0] = udp_fd;
	for (int i = 1; i < opt.sockets; i++) {
		struct sockaddr_in any_port = opt.bind;
		any_port.sin_port = 0;
		send_fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (send_fds[i] < 0 || bind(send_fds[i], (struct sockaddr *)&any_port,
					    sizeof any_port) < 0)
			die("--sockets");
	}
	int ack_fd = opt.ack_listen ? open_ack_listener() : -1;
	if (opt.have_dest)
		setup_sender();

	pthread_t sink_thread;
	if (opt.receive && pthread_create(&sink_thread, NULL, sink, NULL))
		die("pthread_create");
	int64_t cpu_start = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
	printf("ready\n");
	fflush(stdout);

	char line[128];
	long long start = 0;
	if (!fgets(line, sizeof line, stdin) || sscanf(line, "go %lld", &start) != 1) {
		atomic_store(&stop_now, 1);  /* the benchmark went away */
	} else if (opt.have_dest) {
		int64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
		send_start_ns = start;
		if (opt.window > 0)
			run_window(start, ack_fd);
		else if (opt.rate > 0)
			run_paced(start);
		else
			run_unpaced(start);
		send_end_ns = mono_ns();
		send_cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
		printf("sent\n");
		fflush(stdout);
	}
	if (opt.receive)
		pthread_join(sink_thread, NULL);
	int64_t cpu_ns = clock_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
	if (opt.records)
		write_records();
	printf("{\"sent\": %" PRIu64 ", \"sent_burst\": %" PRIu64 ", \"send_errors\": %" PRIu64
	       ", \"stalls\": %" PRIu64 ", \"send_start_ns\": %" PRId64 ", \"send_end_ns\": %" PRId64
	       ", \"send_cpu_ns\": %" PRId64 ", \"received\": %" PRIu64
	       ", \"received_bytes\": %" PRIu64 ", \"malformed\": %" PRIu64
	       ", \"untimed\": %" PRIu64
	       ", \"ack_failures\": %" PRIu64 ", \"recv_cpu_ns\": %" PRId64
	       ", \"cpu_ns\": %" PRId64 "}\n",
	       sent, sent_burst, send_errors, stalls, send_start_ns, send_end_ns, send_cpu_ns,
	       received, received_bytes, malformed, untimed, ack_failures, recv_cpu_ns, cpu_ns);
	fflush(stdout);
	return 0;
}
