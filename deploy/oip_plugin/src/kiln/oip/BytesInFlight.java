package kiln.oip;

import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.util.ReferenceCountUtil;
import java.util.ArrayDeque;
import java.util.Queue;
import java.util.concurrent.atomic.AtomicLong;

/**
 * After the HTTP codec, before the body is gathered: each request takes its body's bytes
 * from a bound shared by every connection (RequestLimits.maxBytesInFlight) when its head
 * arrives, and gives them back once it is answered. A request past the bound gets 503 with
 * Retry-After before its body is read, and the connection closes. One per connection, on its
 * event loop.
 */
final class BytesInFlight extends ChannelInboundHandlerAdapter {
    // As kiln.handlers.errors.RETRY_AFTER_S: sent again, the request finds room.
    static final String RETRY_AFTER_S = "1";

    private final AtomicLong total;
    private final long bound;
    private final long maxBody;
    private final ConnectionGuard guard;
    private final Queue<Long> held = new ArrayDeque<>();  // per request, in answer order
    private boolean refused;

    /** total: the bytes every connection holds; maxBody: what a chunked body may grow to. */
    BytesInFlight(AtomicLong total, long bound, long maxBody, ConnectionGuard guard) {
        this.total = total;
        this.bound = bound;
        this.maxBody = maxBody;
        this.guard = guard;
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) {
        if (refused) {  // the rest of a refused request, and anything after it
            ReferenceCountUtil.release(msg);
            return;
        }
        if (msg instanceof HttpRequest && !take(size((HttpRequest) msg))) {
            refused = true;
            ReferenceCountUtil.release(msg);
            guard.close(Reply.error(503, "the server holds " + bound + " bytes of requests, its "
                    + "limit: try again later").withHeader("Retry-After", RETRY_AFTER_S));
            return;
        }
        ctx.fireChannelRead(msg);
    }

    /** What a request's body will take: its Content-Length, or all it may be if chunked. */
    private long size(HttpRequest request) {
        if (request.decoderResult().isFailure()) {
            return 0;  // OipHandler refuses it as malformed, unread
        }
        return HttpUtil.isTransferEncodingChunked(request)
                ? maxBody : Math.min(maxBody, Math.max(0, HttpUtil.getContentLength(request, 0L)));
    }

    private boolean take(long bytes) {
        long now = total.addAndGet(bytes);
        if (bytes > 0 && now > bound) {
            total.addAndGet(-bytes);
            return false;
        }
        held.add(bytes);
        return true;
    }

    /** The oldest request of this connection is answered. */
    void answered() {
        Long bytes = held.poll();
        if (bytes != null) {
            total.addAndGet(-bytes);
        }
    }

    @Override
    public void channelInactive(ChannelHandlerContext ctx) {
        while (!held.isEmpty()) {
            answered();
        }
        ctx.fireChannelInactive();
    }
}
