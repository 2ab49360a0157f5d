package kiln.oip;

import io.netty.bootstrap.ServerBootstrap;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelOption;
import io.netty.channel.ChannelPipeline;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.nio.NioEventLoopGroup;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.handler.codec.http.HttpMessage;
import io.netty.handler.codec.http.HttpObjectAggregator;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.util.concurrent.DefaultThreadFactory;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import org.pytorch.serve.util.ConfigManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol on its own address, inside TorchServe's JVM, on the Netty that
 * TorchServe carries.
 *
 * Not a plugin endpoint on the inference port: TorchServe 0.12 releases a request's body
 * before a plugin endpoint runs (pytorch/serve#2595), so a plugin cannot read an infer body
 * reliably. This server reads it itself and queues it to the model's workers.
 */
final class OipServer {

    /** host:port, set with -Dkiln.oip.address=... in config.properties' vmargs. */
    static final String ADDRESS_PROPERTY = "kiln.oip.address";
    // What a request may be: its request line (the URI), all its headers together, how many.
    static final int MAX_INITIAL_LINE = 8192;
    static final int MAX_HEADER_BYTES = 16384;
    static final int MAX_HEADERS = 100;
    private static final int MAX_CHUNK = 8192;
    // The event loops only move bytes and wait on nothing: a few threads serve every connection.
    private static final int LOOP_THREADS = Math.min(4, Runtime.getRuntime().availableProcessors());
    private static final Logger LOG = LoggerFactory.getLogger(OipServer.class);

    private OipServer() {}

    /** Serves OIP on the configured address, if any, with the versions' route and shadows. */
    static void start(Router router, Shadow shadow) {
        String address = System.getProperty(ADDRESS_PROPERTY);
        if (address == null) {
            return;
        }
        try {
            start(address, ConnectionGuard.Limits.fromProperties(), router, shadow);
        } catch (RuntimeException e) {
            // A server that cannot offer what it was configured to offer must not start.
            throw new IllegalStateException("cannot serve OIP on " + address, e);
        }
    }

    private static void start(String address, ConnectionGuard.Limits limits, Router router,
            Shadow shadow) {
        int colon = address.lastIndexOf(':');
        String host = address.substring(0, colon);
        int port = Integer.parseInt(address.substring(colon + 1));
        // Daemon threads: never keep TorchServe alive past its own shutdown.
        EventLoopGroup boss = new NioEventLoopGroup(1, new DefaultThreadFactory("kiln-oip-accept", true));
        EventLoopGroup loops = new NioEventLoopGroup(LOOP_THREADS, new DefaultThreadFactory("kiln-oip", true));
        RequestLimits requestLimits = RequestLimits.fromProperties();
        OipRoutes routes = new OipRoutes(requestLimits, router, shadow);
        AtomicInteger open = new AtomicInteger();
        AtomicLong inFlight = new AtomicLong();
        int maxBody = ConfigManager.getInstance().getMaxRequestSize();
        new ServerBootstrap()
                .group(boss, loops)
                .channel(NioServerSocketChannel.class)
                .option(ChannelOption.SO_BACKLOG, 1024)
                .childOption(ChannelOption.TCP_NODELAY, true)
                .childHandler(new ChannelInitializer<SocketChannel>() {
                    @Override
                    protected void initChannel(SocketChannel channel) {
                        ConnectionGuard guard = new ConnectionGuard(limits, open);
                        BytesInFlight bytes = new BytesInFlight(inFlight,
                                requestLimits.maxBytesInFlight, maxBody, guard);
                        channel.pipeline().addLast(guard,
                                new HttpServerCodec(MAX_INITIAL_LINE, MAX_HEADER_BYTES, MAX_CHUNK),
                                bytes, new BodyLimit(maxBody, guard),
                                new OipHandler(routes, guard, bytes));
                    }
                })
                .bind(host, port)
                .syncUninterruptibly();
        LOG.info("Open Inference Protocol served on http://{}/v2 (read timeout {} s, idle timeout "
                + "{} s, at most {} connections, {} bytes of requests)", address, limits.readTimeoutS,
                limits.idleTimeoutS, limits.maxConnections, requestLimits.maxBytesInFlight);
    }

    /** A request's body, whole, up to TorchServe's max_request_size; over it, a 413 at once. */
    private static final class BodyLimit extends HttpObjectAggregator {
        private final ConnectionGuard guard;

        BodyLimit(int maxBytes, ConnectionGuard guard) {
            super(maxBytes);
            this.guard = guard;
        }

        @Override
        protected Object newContinueResponse(HttpMessage start, int maxBytes, ChannelPipeline pipeline) {
            // Too large for "Expect: 100-continue": the 413 below, not Netty's empty one.
            return HttpUtil.getContentLength(start, -1L) > maxBytes
                    ? null : super.newContinueResponse(start, maxBytes, pipeline);
        }

        @Override
        protected void handleOversizedMessage(ChannelHandlerContext ctx, HttpMessage oversized) {
            // A Content-Length over the limit is answered before its body; a chunked body as
            // soon as it grows past the limit.
            guard.close(Reply.error(413, "the request body is over max_request_size ("
                    + maxContentLength() + " bytes)"));
        }
    }
}
