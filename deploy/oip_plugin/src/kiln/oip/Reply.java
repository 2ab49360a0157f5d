package kiln.oip;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import java.nio.charset.StandardCharsets;

/** One HTTP answer: status, content type and body. */
final class Reply {
    static final String JSON = "application/json";

    final int status;
    final String contentType;
    final byte[] body;

    Reply(int status, String contentType, byte[] body) {
        this.status = status;
        this.contentType = contentType;
        this.body = body;
    }

    static Reply json(int status, JsonElement body) {
        return new Reply(status, JSON, body.toString().getBytes(StandardCharsets.UTF_8));
    }

    /** Kiln's error shape everywhere: OIP's {"error": ...} plus the status, as the handler sends. */
    static Reply error(int status, String message) {
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        body.addProperty("code", status);
        return json(status, body);
    }
}
