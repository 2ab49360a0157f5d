package kiln.oip;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;

/**
 * How the OIP server gets started: TorchServe instantiates its plugin endpoints at start-up,
 * and this one starts OipServer. On the inference port, GET /kiln-oip says where OIP is served.
 */
@Endpoint(
        urlPattern = "kiln-oip",
        endpointType = EndpointTypes.INFERENCE,
        description = "Where Kiln serves the Open Inference Protocol (KServe v2)")
public class OipEndpoint extends ModelServerEndpoint {

    public OipEndpoint() {
        OipServer.startOnce();
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
