/*
 * The benchmark's load source: frames out of an AF_PACKET socket with sendmmsg(2).
 *
 * The caller prepares one complete frame per flow (headers, checksums) in a table; each
 * call sends `count` frames, walking the table in order from *next and wrapping, so the
 * flows come round-robin exactly. With PACKET_QDISC_BYPASS set on the socket, a frame
 * goes straight to the device's transmit routine (as pktgen does); a veth whose peer ring
 * is full then refuses it with ENOBUFS. Such a frame was not sent: the call yields the CPU
 * and sends it again, so every frame counted here left the device.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define SEND_BATCH 256

/* Returns the frames sent (== count) or -errno on an error other than a full ring;
 * *busy_retries counts the ENOBUFS/EAGAIN answers that were retried. */
long pft_send_frames(int fd, const uint8_t *table, uint32_t frame_len, uint32_t nframes,
		     uint32_t *next, uint64_t count, uint64_t *busy_retries)
{
	struct mmsghdr msgs[SEND_BATCH];
	struct iovec iov[SEND_BATCH];
	uint64_t done = 0;
	uint32_t at = *next;

	if (!nframes || !frame_len)
		return -EINVAL;
	memset(msgs, 0, sizeof(msgs));
	while (done < count) {
		uint32_t n = count - done < SEND_BATCH ? (uint32_t)(count - done) : SEND_BATCH;
		uint32_t i, idx = at;
		int sent;

		for (i = 0; i < n; i++) {
			iov[i].iov_base = (void *)(table + (uint64_t)idx * frame_len);
			iov[i].iov_len = frame_len;
			msgs[i].msg_hdr.msg_iov = &iov[i];
			msgs[i].msg_hdr.msg_iovlen = 1;
			idx = idx + 1 == nframes ? 0 : idx + 1;
		}
		sent = sendmmsg(fd, msgs, n, 0);
		if (sent < 0) {
			if (errno == ENOBUFS || errno == EAGAIN) {
				(*busy_retries)++;
				sched_yield();
				continue;
			}
			if (errno == EINTR)
				continue;
			*next = at;
			return -errno;
		}
		done += sent;
		at = (uint32_t)((at + (uint64_t)sent) % nframes);
	}
	*next = at;
	return (long)done;
}
