package kiln.oip;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicBoolean;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.TokenAuthorization;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol on its own address, inside TorchServe's JVM.
 *
 * Not a plugin endpoint on the inference port: TorchServe 0.12 releases a request's body
 * before a plugin endpoint runs (pytorch/serve#2595), so a plugin cannot read an infer body
 * reliably. This server reads it itself and queues it to the model's workers.
 */
final class OipServer {

    /** host:port, set with -Dkiln.oip.address=... in config.properties' vmargs. */
    static final String ADDRESS_PROPERTY = "kiln.oip.address";
    // Infer holds a thread until the worker answers; TorchServe's job queue does the waiting.
    private static final int THREADS = 32;
    private static final Logger LOG = LoggerFactory.getLogger(OipServer.class);
    private static final AtomicBoolean STARTED = new AtomicBoolean();

    private final OipRoutes routes = new OipRoutes();

    private OipServer() {}

    /** Starts the server once per JVM (TorchServe instantiates its plugins more than once). */
    static void startOnce() {
        String address = System.getProperty(ADDRESS_PROPERTY);
        if (address == null || !STARTED.compareAndSet(false, true)) {
            return;
        }
        try {
            new OipServer().start(address);
        } catch (IOException | RuntimeException e) {
            // A server that cannot offer what it was configured to offer must not start.
            throw new IllegalStateException("cannot serve OIP on " + address, e);
        }
    }

    private void start(String address) throws IOException {
        int colon = address.lastIndexOf(':');
        InetSocketAddress bind = new InetSocketAddress(
                address.substring(0, colon), Integer.parseInt(address.substring(colon + 1)));
        HttpServer server = HttpServer.create(bind, 0);
        ExecutorService pool = Executors.newFixedThreadPool(THREADS, task -> {
            Thread thread = new Thread(task, "kiln-oip");
            thread.setDaemon(true);  // never keeps TorchServe alive past its own shutdown
            return thread;
        });
        server.setExecutor(pool);
        server.createContext("/", this::serve);
        server.start();
        LOG.info("Open Inference Protocol served on http://{}/v2", address);
    }

    private void serve(HttpExchange exchange) throws IOException {
        try {
            reply(exchange, answer(exchange));
        } catch (IOException | RuntimeException e) {
            LOG.error("OIP request {} failed", exchange.getRequestURI(), e);
            reply(exchange, Reply.error(500, "internal error"));
        } finally {
            exchange.close();
        }
    }

    private Reply answer(HttpExchange exchange) throws IOException {
        if (!authorised(exchange.getRequestHeaders().getFirst("Authorization"))) {
            return Reply.error(401, "token authorization failed: send the inference token "
                    + "as 'Authorization: Bearer <token>'");
        }
        String method = exchange.getRequestMethod();
        byte[] body = method.equals("POST") ? readBody(exchange) : null;
        if (body == null && method.equals("POST")) {
            return Reply.error(413, "request body is larger than max_request_size");
        }
        return routes.handle(method, exchange.getRequestURI().getPath(), body,
                exchange.getRequestHeaders().getFirst("Content-Type"));
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

    /** The body, or null when it is over TorchServe's max_request_size. */
    private static byte[] readBody(HttpExchange exchange) throws IOException {
        int limit = ConfigManager.getInstance().getMaxRequestSize();
        try (InputStream in = exchange.getRequestBody()) {
            byte[] body = in.readNBytes(limit + 1);
            return body.length > limit ? null : body;
        }
    }

    private static void reply(HttpExchange exchange, Reply reply) throws IOException {
        exchange.getResponseHeaders().set("Content-Type", reply.contentType);
        exchange.sendResponseHeaders(reply.status, reply.body.length == 0 ? -1 : reply.body.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(reply.body);
        }
    }
}
