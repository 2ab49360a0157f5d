package kiln.oip;

import io.grpc.BindableService;
import io.grpc.ServerInterceptors;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.net.InetSocketAddress;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.ConnectorType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Kiln's gRPC server, inside TorchServe's JVM, on an address of its own (the front proxy's
 * gRPC port forwards to it). Each service on it is behind the same two interceptors: the
 * token TorchServe's inference API demands, and the metadata Kiln adds to every answer.
 * TorchServe's InferenceAPIsService is served here (GrpcInference) rather than on TorchServe's
 * own gRPC port, whose answers cannot say which version gave them: TorchServe drops a
 * handler's headers on gRPC, and picks the default version for every unpinned call.
 */
final class GrpcServer {

    /** host:port, set with -Dkiln.grpc.address=... in config.properties' vmargs. */
    static final String ADDRESS_PROPERTY = "kiln.grpc.address";
    private static final Logger LOG = LoggerFactory.getLogger(GrpcServer.class);

    private GrpcServer() {}

    /** Starts serving `services` on the address in `property`; nothing when none is set. */
    static void start(String property, List<BindableService> services) {
        String address = System.getProperty(property);
        if (address == null) {
            return;
        }
        int colon = address.lastIndexOf(':');
        ConfigManager config = ConfigManager.getInstance();
        NettyServerBuilder builder = NettyServerBuilder
                .forAddress(new InetSocketAddress(address.substring(0, colon),
                        Integer.parseInt(address.substring(colon + 1))))
                // What TorchServe's own gRPC inference server is built with, so that the
                // front proxy's limits read the same (a message over max_request_size, or
                // metadata over gRPC's default 8 KiB, refused on its stream alone).
                .maxInboundMessageSize(config.getMaxRequestSize())
                .maxConnectionAge(config.getGRPCMaxConnectionAge(ConnectorType.INFERENCE_CONNECTOR),
                        TimeUnit.MILLISECONDS)
                .maxConnectionAgeGrace(
                        config.getGRPCMaxConnectionAgeGrace(ConnectorType.INFERENCE_CONNECTOR),
                        TimeUnit.MILLISECONDS);
        // Interceptors run last-given first: the token is checked before anything else.
        services.forEach(service -> builder.addService(ServerInterceptors.intercept(service,
                new GrpcCall.Marks(), new GrpcCall.TokenCheck())));
        try {
            builder.build().start();
        } catch (IOException e) {
            // A server that cannot offer what it was configured to offer must not start.
            throw new UncheckedIOException("cannot serve Kiln's gRPC on " + address, e);
        }
        LOG.info("Kiln's gRPC {} served on {}", services.stream()
                .map(service -> service.bindService().getServiceDescriptor().getName())
                .collect(Collectors.joining(", ")), address);
    }
}
