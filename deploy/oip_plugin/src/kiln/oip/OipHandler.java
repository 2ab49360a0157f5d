package kiln.oip;

import io.netty.buffer.ByteBuf;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.SimpleChannelInboundHandler;
import io.netty.handler.codec.DecoderException;
import io.netty.handler.codec.DecoderResult;
import io.netty.handler.codec.TooLongFrameException;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaders;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.IOException;
import java.util.ArrayDeque;
import java.util.Locale;
import java.util.Map;
import java.util.Queue;
import java.util.Set;
import java.util.concurrent.CompletableFuture;
import org.pytorch.serve.util.TokenAuthorization;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Last in each connection's pipeline: answers its requests one at a time, in order (a client
 * that pipelines waits its turn), checking the token, then asking OipRoutes. The event loop
 * never waits: an infer's answer is written when its future completes.
 */
final class OipHandler extends SimpleChannelInboundHandler<FullHttpRequest> {

    private static final Logger LOG = LoggerFactory.getLogger(OipHandler.class);

    /**
     * What a request says, copied out of Netty's buffers (which are released on return), but
     * its body: that stays in Netty's (pooled, off the heap) buffer, retained until release(),
     * so that a request refused from its header is never copied.
     */
    private static final class Call {
        final String method;
        final String path;
        final ByteBuf body;
        final String contentType;
        final String binaryHeader;
        final String routingKey;
        final String formType;
        final String authorization;
        final Map<String, String> traced;
        final HttpVersion version;
        final boolean keepAlive;

        Call(FullHttpRequest request) {
            method = request.method().name();
            path = new QueryStringDecoder(request.uri()).path();
            contentType = request.headers().get(HttpHeaderNames.CONTENT_TYPE);
            binaryHeader = request.headers().get(BinaryTensors.HEADER);
            routingKey = request.headers().get(Router.KEY_HEADER);
            formType = request.headers().get(OipRoutes.FORM_TYPE_HEADER);
            authorization = request.headers().get(HttpHeaderNames.AUTHORIZATION);
            traced = Traced.of(request.headers());
            version = request.protocolVersion();
            keepAlive = HttpUtil.isKeepAlive(request);
            // Last: nothing above may throw once it is retained.
            body = request.method().equals(HttpMethod.POST) ? request.content().retainedSlice() : null;
        }

        void release() {
            if (body != null) {
                body.release();
            }
        }
    }

    // Kiln's front proxy sets these on every request it forwards, whether the client sent
    // them or not (deploy/nginx/nginx.conf: Host, TorchServe's token, the form type of a form
    // body, as kiln.handlers.forms.FORM_TYPE_HEADER, and Traced.TO_WORKER): a client's
    // MAX_HEADERS leave them out.
    private static final Set<String> PROXY_HEADERS = Set.of("host", "authorization",
            "kiln-form-type", "x-request-id", "traceparent", "kiln-received");

    private final OipRoutes routes;
    private final ConnectionGuard guard;
    private final BytesInFlight bytes;
    private final Queue<Call> waiting = new ArrayDeque<>();
    private boolean answering;

    OipHandler(OipRoutes routes, ConnectionGuard guard, BytesInFlight bytes) {
        this.routes = routes;
        this.guard = guard;
        this.bytes = bytes;
    }

    @Override
    protected void channelRead0(ChannelHandlerContext ctx, FullHttpRequest request) {
        guard.received();
        Reply refusal = refusal(request);
        Call call = null;
        if (refusal == null) {
            try {
                call = new Call(request);
            } catch (IllegalArgumentException e) {  // a bad %-escape in the path
                refusal = Reply.error(400, "malformed request URI: " + e.getMessage());
            }
        }
        if (refusal != null) {
            guard.close(refusal);
        } else if (answering) {
            waiting.add(call);
            ctx.channel().config().setAutoRead(false);  // one waiting is enough
        } else {
            answer(ctx, call);
        }
    }

    /** The answer to a request that cannot be served, after which the connection closes. */
    private static Reply refusal(FullHttpRequest request) {
        DecoderResult decoded = request.decoderResult();
        if (decoded.isFailure()) {
            Throwable cause = decoded.cause();
            if (cause instanceof TooLongFrameException) {
                // Netty 4.1.53 tells a too long request line from too large headers by message only.
                return String.valueOf(cause.getMessage()).startsWith("HTTP header")
                        ? Reply.error(431, "the request's headers are over "
                                + OipServer.MAX_HEADER_BYTES + " bytes")
                        : Reply.error(414, "the request line (its URI) is over "
                                + OipServer.MAX_INITIAL_LINE + " bytes");
            }
            return Reply.error(400, "malformed HTTP request: " + cause.getMessage());
        }
        if (clientHeaders(request.headers()) > OipServer.MAX_HEADERS) {
            return Reply.error(431, "the request has more than " + OipServer.MAX_HEADERS + " headers");
        }
        return null;
    }

    /** The headers a client sent: all but those the front proxy sets itself. */
    static long clientHeaders(HttpHeaders headers) {
        return headers.entries().stream()
                .filter(header -> !PROXY_HEADERS.contains(header.getKey().toLowerCase(Locale.ROOT)))
                .count();
    }

    private void answer(ChannelHandlerContext ctx, Call call) {
        answering = true;
        CompletableFuture<Reply> reply;
        try {
            reply = authorised(call.authorization)
                    ? routes.handle(call.method, call.path, call.body, call.contentType,
                            call.binaryHeader, call.routingKey, call.formType, call.traced)
                    : CompletableFuture.completedFuture(Reply.error(401, "token authorization failed: "
                            + "send the inference token as 'Authorization: Bearer <token>'"));
        } catch (RuntimeException e) {
            reply = CompletableFuture.failedFuture(e);
        }
        reply.whenCompleteAsync((answer, error) -> {
            if (error != null) {
                LOG.error("OIP request {} {} failed", call.method, call.path, error);
                answer = Reply.error(500, "internal error");
            }
            send(ctx, call, answer);
        }, ctx.executor());
    }

    private void send(ChannelHandlerContext ctx, Call call, Reply reply) {
        call.release();
        bytes.answered();
        if (guard.closing() || !ctx.channel().isActive()) {
            return;
        }
        if (!call.keepAlive) {
            ctx.writeAndFlush(reply.toHttp(call.version, false)).addListener(ChannelFutureListener.CLOSE);
            return;
        }
        ctx.writeAndFlush(reply.toHttp(call.version, true));
        Call next = waiting.poll();
        if (next != null) {
            answer(ctx, next);
            return;
        }
        answering = false;
        ctx.channel().config().setAutoRead(true);
        guard.idle();
    }

    /** Requests still waiting their turn are never answered once the connection is gone. */
    @Override
    public void channelInactive(ChannelHandlerContext ctx) {
        for (Call call = waiting.poll(); call != null; call = waiting.poll()) {
            call.release();
        }
        ctx.fireChannelInactive();
    }

    /** The same tokens as the inference API, checked by TorchServe's own code. */
    private static boolean authorised(String header) {
        if (!TokenAuthorization.isEnabled()) {
            return true;
        }
        if (header == null) {
            return false;
        }
        String token = TokenAuthorization.parseTokenFromBearerTokenHeader(header);
        return token != null
                && TokenAuthorization.checkTokenAuthorization(token, TokenAuthorization.TokenType.INFERENCE);
    }

    @Override
    public void exceptionCaught(ChannelHandlerContext ctx, Throwable cause) {
        if (cause instanceof DecoderException) {  // a request Netty could not take apart
            Throwable reason = cause.getCause() == null ? cause : cause.getCause();
            LOG.debug("OIP connection {}: malformed request", ctx.channel(), cause);
            guard.close(Reply.error(400, "malformed HTTP request: " + reason.getMessage()));
            return;
        }
        if (cause instanceof IOException) {  // the client went away
            LOG.debug("OIP connection {} failed", ctx.channel(), cause);
        } else {
            LOG.warn("OIP connection {} failed", ctx.channel(), cause);
        }
        ctx.close();
    }
}
