package kiln.oip;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.concurrent.atomic.AtomicBoolean;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;

/**
 * How Kiln's servers get started: TorchServe instantiates its plugin endpoints at start-up,
 * and this one starts OipServer and GrpcServer. On the inference port, GET /kiln-oip says
 * where OIP is served.
 */
@Endpoint(
        urlPattern = "kiln-oip",
        endpointType = EndpointTypes.INFERENCE,
        description = "Where Kiln serves the Open Inference Protocol (KServe v2)")
public class OipEndpoint extends ModelServerEndpoint {

    private static final AtomicBoolean STARTED = new AtomicBoolean();

    public OipEndpoint() {
        startOnce();
    }

    /**
     * Starts the servers once per JVM (TorchServe instantiates its plugins more than once).
     * They share one route state and one shadow scorer: a route change (and the sync kiln
     * retire asks for before it drains) holds for every protocol at once, and a candidate's
     * bound on pairs in flight counts its samples from all of them.
     */
    private static void startOnce() {
        if (!STARTED.compareAndSet(false, true)) {
            return;
        }
        Router router = Router.fromProperty();
        Shadow shadow = new Shadow();
        OipServer.start(router, shadow);
        GrpcServer.start(GrpcServer.ADDRESS_PROPERTY, List.of(new GrpcInference(router, shadow)));
        GrpcServer.start(GrpcOip.ADDRESS_PROPERTY, List.of(new GrpcOip(router, shadow)));
    }

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        JsonObject body = new JsonObject();
        String address = System.getProperty(OipServer.ADDRESS_PROPERTY);
        body.addProperty("oip", address == null ? null : "http://" + address + "/v2");
        rsp.setStatus(200);
        rsp.setContentType(Reply.JSON);
        try (OutputStream out = rsp.getOutputStream()) {
            out.write(body.toString().getBytes(StandardCharsets.UTF_8));
        }
    }
}
