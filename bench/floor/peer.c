/* The floor of eKuiper's round trips: an SP peer that costs next to nothing (bench/hotpath.py
 * --floor; bench/floor/plugin.py hands it connections already past the SP handshake).
 *
 *   peer func FD            answer every call on REQ connection FD: {"state":true,"result":<1st arg>}
 *   peer sink DATAFD [ACKFD] read every item; with ACKFD write {} as each one's ack
 *   peer source FD          push one small message after another until the peer goes
 *
 * Blocking reads, one write per message. It exits when its peer closes. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int read_all(int fd, unsigned char *b, size_t n)
{
	for (size_t got = 0; got < n;) {
		ssize_t r = recv(fd, b + got, n - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static int write_all(int fd, const unsigned char *b, size_t n)
{
	for (size_t put = 0; put < n;) {
		ssize_t w = send(fd, b + put, n - put, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		put += (size_t)w;
	}
	return 0;
}

static uint64_t get64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static void put64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = v & 0xff;
}

static unsigned char buf[1 << 20], out[1 << 12];

/* one SP message into buf (NUL-terminated); its length, or -1 at the end */
static long read_msg(int fd)
{
	if (read_all(fd, buf, 9))
		return -1;
	uint64_t n = get64(buf + 1);
	if (n >= sizeof buf || read_all(fd, buf, n))
		return -1;
	buf[n] = 0;
	return (long)n;
}

static int send_msg(int fd, const char *id, const char *body)
{
	size_t idn = id ? 4 : 0, n = strlen(body);
	if (9 + idn + n > sizeof out)
		return -1;
	out[0] = 1;
	put64(out + 1, idn + n);
	if (id)
		memcpy(out + 9, id, 4);
	memcpy(out + 9 + idn, body, n);
	return write_all(fd, out, 9 + idn + n);
}

static int func(int fd)
{
	char res[512], id[4];
	for (long n; (n = read_msg(fd)) >= 4;) {
		uint32_t rid = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
		rid = 0x80000000u | ((rid + 1) & 0x7fffffff); /* our next request's id */
		id[0] = (char)(rid >> 24), id[1] = (char)(rid >> 16), id[2] = (char)(rid >> 8), id[3] = (char)rid;
		const char *body = (const char *)buf + 4, *arg = strstr(body, "\"arg\":[\"");
		if (strstr(body, "\"IsAggregate\""))
			snprintf(res, sizeof res, "{\"state\":true,\"result\":false}");
		else if (strstr(body, "\"Exec\"") && arg && strchr(arg + 8, '"'))
			snprintf(res, sizeof res, "{\"state\":true,\"result\":\"%.*s\"}",
				 (int)(strchr(arg + 8, '"') - (arg + 8)), arg + 8);
		else
			snprintf(res, sizeof res, "{\"state\":true,\"result\":\"\"}");
		if (send_msg(fd, id, res))
			return 0;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "func"))
		return func(atoi(argv[2]));
	if (argc >= 3 && !strcmp(argv[1], "sink")) {
		int data = atoi(argv[2]), ack = argc > 3 ? atoi(argv[3]) : -1;
		while (read_msg(data) >= 0)
			if (ack >= 0 && send_msg(ack, NULL, "{}"))
				return 0;
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "source")) {
		int fd = atoi(argv[2]);
		while (!send_msg(fd, NULL, "{\"message\":{\"i\":1},\"meta\":null}"))
			;
		return 0;
	}
	fprintf(stderr, "usage: peer func FD | peer sink DATAFD [ACKFD] | peer source FD\n");
	return 2;
}
