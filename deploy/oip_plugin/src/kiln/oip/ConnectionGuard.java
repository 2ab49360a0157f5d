package kiln.oip;

import io.netty.channel.Channel;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.socket.SocketChannel;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.util.ReferenceCountUtil;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * First in each connection's pipeline, ahead of the HTTP codec: keeps the number of open
 * connections within its bound (503), gives each request a deadline to arrive complete (408)
 * and an idle keep-alive connection a deadline for its next request, and closes with an
 * answer gracefully. One per connection; everything here runs on its event loop.
 */
final class ConnectionGuard extends ChannelInboundHandlerAdapter {

    /** The bounds, from JVM properties (config.properties' vmargs). */
    static final class Limits {
        static final String READ_TIMEOUT = "kiln.oip.read_timeout_s";
        static final String IDLE_TIMEOUT = "kiln.oip.idle_timeout_s";
        static final String MAX_CONNECTIONS = "kiln.oip.max_connections";

        final int readTimeoutS;
        final int idleTimeoutS;
        final int maxConnections;

        private Limits(int readTimeoutS, int idleTimeoutS, int maxConnections) {
            this.readTimeoutS = readTimeoutS;
            this.idleTimeoutS = idleTimeoutS;
            this.maxConnections = maxConnections;
        }

        static Limits fromProperties() {
            return new Limits(positive(READ_TIMEOUT, 30), positive(IDLE_TIMEOUT, 60),
                    positive(MAX_CONNECTIONS, 1024));
        }

        /** A JVM property that must be a whole number >= 1, or `fallback` when unset. */
        static int positive(String property, int fallback) {
            String value = System.getProperty(property);
            if (value == null) {
                return fallback;
            }
            String digits = value.trim();
            int number = digits.matches("[0-9]{1,9}") ? Integer.parseInt(digits) : 0;
            if (number < 1) {
                throw new IllegalArgumentException("-D" + property + " must be a whole number "
                        + ">= 1, got '" + value + "'");
            }
            return number;
        }
    }

    // After answering and before closing, the client's remaining bytes are read and dropped
    // this long: closing a socket with unread input sends a reset, which can make the client
    // lose the answer it was sent (a 413 while it is still sending its body, say).
    private static final long LINGER_MS = 2000;

    private final Limits limits;
    private final AtomicInteger open;
    private ChannelHandlerContext ctx;
    private boolean counted;
    private boolean closing;
    private boolean waiting = true;  // for the first byte of the next request
    private ScheduledFuture<?> deadline;

    /** open: the connections the server has open, shared by all guards. */
    ConnectionGuard(Limits limits, AtomicInteger open) {
        this.limits = limits;
        this.open = open;
    }

    @Override
    public void handlerAdded(ChannelHandlerContext ctx) {
        this.ctx = ctx;
    }

    @Override
    public void channelActive(ChannelHandlerContext ctx) {
        if (open.incrementAndGet() > limits.maxConnections) {
            open.decrementAndGet();
            close(Reply.error(503, "the server has " + limits.maxConnections
                    + " connections open, its limit: try again later").withHeader("Retry-After", "1"));
        } else {
            counted = true;
            await(limits.idleTimeoutS, ctx::close);
        }
        ctx.fireChannelActive();
    }

    @Override
    public void channelInactive(ChannelHandlerContext ctx) {
        if (counted) {
            open.decrementAndGet();
            counted = false;
        }
        cancel();
        ctx.fireChannelInactive();
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) {
        if (closing) {
            ReferenceCountUtil.release(msg);
            return;
        }
        if (waiting) {  // a request begins: all of it must be in within the read timeout
            waiting = false;
            await(limits.readTimeoutS, () -> close(Reply.error(408, "the request was not complete "
                    + "within " + limits.readTimeoutS + " s")));
        }
        ctx.fireChannelRead(msg);
    }

    /** A request is in: no deadline while it is answered (infer has a timeout of its own). */
    void received() {
        cancel();
    }

    /** Every request so far is answered: the connection may idle until the next one starts. */
    void idle() {
        waiting = true;
        await(limits.idleTimeoutS, ctx::close);
    }

    boolean closing() {
        return closing;
    }

    /** Answers with reply, then closes: output first, input after a moment (LINGER_MS). */
    void close(Reply reply) {
        if (closing) {
            return;
        }
        closing = true;
        cancel();
        Channel channel = ctx.channel();
        channel.writeAndFlush(reply.toHttp(HttpVersion.HTTP_1_1, false)).addListener(written -> {
            if (!written.isSuccess() || !(channel instanceof SocketChannel)) {
                channel.close();
                return;
            }
            ((SocketChannel) channel).shutdownOutput().addListener(ChannelFutureListener.CLOSE_ON_FAILURE);
            channel.eventLoop().schedule(() -> channel.close(), LINGER_MS, TimeUnit.MILLISECONDS);
        });
    }

    private void await(int seconds, Runnable expired) {
        cancel();
        deadline = ctx.executor().schedule(expired, seconds, TimeUnit.SECONDS);
    }

    private void cancel() {
        if (deadline != null) {
            deadline.cancel(false);
            deadline = null;
        }
    }
}
