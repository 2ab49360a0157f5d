package kiln.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import io.netty.buffer.ByteBuf;
import java.io.ByteArrayOutputStream;
import java.math.BigDecimal;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * The binary tensor data extension of the KServe v2 / Triton HTTP protocol, checked at the
 * door: a request's framing and its size against the handler's limits are checked from its
 * JSON header, read in place from Netty's buffer before a byte of tensor data is looked at or
 * copied (a refused 4 MB request costs the heap its header only), and the body then goes to the
 * model's workers as it came, the JSON header's length in the header WORKER_HEADER: the
 * handler reads each tensor in place (handlers/oip.py). Tensors once became JSON text here,
 * some 25 MB for a 4 MB request, and eight clients ran the JVM out of heap (issue 16). The
 * outputs a client asks for in binary are cut out of the handler's JSON answer.
 *
 * A request with the header Inference-Header-Content-Length: N holds N bytes of JSON, then
 * the raw bytes of every input whose parameters carry binary_data_size, in input order.
 * Little-endian, row-major; BYTES elements are a 4-byte little-endian length, then the bytes.
 */
final class BinaryTensors {

    static final String HEADER = "Inference-Header-Content-Length";
    // As kiln.handlers.oip.BINARY_HEADER: set on a request forwarded with binary inputs.
    static final String WORKER_HEADER = "kiln-binary-header-length";
    static final String OCTET_STREAM = "application/octet-stream";
    private static final String SIZE = "binary_data_size";
    // Every parameter of the extension holds this in its name; a body without it uses none.
    private static final byte[] MARK = "binary_data".getBytes(StandardCharsets.US_ASCII);
    // Bytes per element; 0 for BYTES, whose elements carry their own length.
    private static final Map<String, Integer> WIDTH = Map.ofEntries(
            Map.entry("BOOL", 1), Map.entry("INT8", 1), Map.entry("UINT8", 1),
            Map.entry("INT16", 2), Map.entry("UINT16", 2), Map.entry("FP16", 2),
            Map.entry("INT32", 4), Map.entry("UINT32", 4), Map.entry("FP32", 4),
            Map.entry("INT64", 8), Map.entry("UINT64", 8), Map.entry("FP64", 8),
            Map.entry("BYTES", 0));

    /** What is wrong with a request, said to the client with its status (400 or 413). */
    static final class BadRequest extends Exception {
        private static final long serialVersionUID = 1L;
        final int status;

        BadRequest(String message) {
            this(400, message);
        }

        BadRequest(int status, String message) {
            super(message);
            this.status = status;
        }
    }

    /** One input sent as binary data, its size checked against its shape and datatype. */
    private static final class BinaryInput {
        final String what;
        final String datatype;
        final long rows;
        final long count;
        final int size;

        BinaryInput(String what, String datatype, long rows, long count, int size) {
            this.what = what;
            this.datatype = datatype;
            this.rows = rows;
            this.count = count;
            this.size = size;
        }
    }

    private final int jsonLength;
    private final boolean binaryInputs;
    private final boolean allOutputs;
    private final Map<String, Boolean> outputs;

    private BinaryTensors(int jsonLength, boolean binaryInputs, boolean allOutputs,
            Map<String, Boolean> outputs) {
        this.jsonLength = jsonLength;
        this.binaryInputs = binaryInputs;
        this.allOutputs = allOutputs;
        this.outputs = outputs;
    }

    /** Whether a body without the header may ask for binary outputs (a quick byte scan). */
    static boolean mayUse(ByteBuf body) {
        return contains(body, MARK);
    }

    /**
     * The request's framing checked, and its binary inputs' rows and values within `limits`;
     * null when the request uses no part of the extension (its body goes on as it is).
     * headerLength: the Inference-Header-Content-Length header, or null. body: the whole
     * request body, from index 0, only read.
     */
    static BinaryTensors parse(ByteBuf body, String headerLength, RequestLimits limits)
            throws BadRequest {
        if (headerLength == null && !mayUse(body)) {
            return null;
        }
        int bodyLength = body.readableBytes();
        int jsonLength = headerLength == null ? bodyLength : jsonLength(headerLength, bodyLength);
        JsonObject request = jsonObject(body, jsonLength);
        List<BinaryInput> inputs = binaryInputs(request);
        if (!inputs.isEmpty() && headerLength == null) {
            throw new BadRequest(inputs.get(0).what + " has " + SIZE + ", but the request has no "
                    + HEADER + " header to say where its JSON ends");
        }
        long sum = 0;
        for (BinaryInput input : inputs) {
            sum += input.size;
        }
        if (sum != bodyLength - jsonLength) {
            throw new BadRequest("the inputs' " + SIZE + " add up to " + sum + " bytes, but "
                    + (bodyLength - jsonLength) + " bytes follow the " + jsonLength
                    + "-byte JSON header");
        }
        admit(inputs, limits);
        int offset = jsonLength;
        for (BinaryInput input : inputs) {
            if (input.datatype.equals("BYTES")) {
                checkBytes(input, body.slice(offset, input.size));
            }
            offset += input.size;
        }
        return new BinaryTensors(jsonLength, !inputs.isEmpty(),
                isTrue(object(request, "parameters"), "binary_data_output"), binaryOutputs(request));
    }

    /** The JSON header's length, for the handler, when the body holds binary inputs. */
    boolean hasBinaryInputs() {
        return binaryInputs;
    }

    int jsonLength() {
        return jsonLength;
    }

    /** The handler's answer with the outputs asked for in binary moved after its JSON. */
    Reply answer(Reply reply) {
        if (reply.status != 200 || !(allOutputs || outputs.containsValue(true))) {
            return reply;
        }
        JsonObject response = JsonParser.parseString(
                new String(reply.body, StandardCharsets.UTF_8)).getAsJsonObject();
        ByteArrayOutputStream data = new ByteArrayOutputStream();
        boolean any = false;
        for (JsonElement element : response.getAsJsonArray("outputs")) {
            JsonObject output = element.getAsJsonObject();
            if (!outputs.getOrDefault(output.get("name").getAsString(), allOutputs)) {
                continue;
            }
            byte[] bytes = encode(output.get("datatype").getAsString(), output.get("data"));
            if (bytes == null) {
                continue;  // a datatype Kiln never answers with stays JSON, as the protocol allows
            }
            output.remove("data");
            JsonObject parameters = object(output, "parameters");
            parameters.addProperty(SIZE, bytes.length);
            output.add("parameters", parameters);
            data.writeBytes(bytes);
            any = true;
        }
        if (!any) {
            return reply;
        }
        byte[] header = response.toString().getBytes(StandardCharsets.UTF_8);
        byte[] body = new byte[header.length + data.size()];
        System.arraycopy(header, 0, body, 0, header.length);
        System.arraycopy(data.toByteArray(), 0, body, header.length, data.size());
        Reply binary = new Reply(200, OCTET_STREAM, body);
        binary.headers.putAll(reply.headers);  // which version answered, say
        return binary.withHeader(HEADER, Integer.toString(header.length));
    }

    // --- the request ----------------------------------------------------------------------

    private static int jsonLength(String header, int bodyLength) throws BadRequest {
        long length;
        try {
            length = Long.parseLong(header.trim());
        } catch (NumberFormatException e) {
            length = -1;
        }
        if (length < 0) {
            throw new BadRequest(HEADER + " must be a whole number >= 0, got '" + header + "'");
        }
        if (length > bodyLength) {
            throw new BadRequest(HEADER + " is " + length + ", but the body has only "
                    + bodyLength + " bytes");
        }
        return (int) length;
    }

    private static JsonObject jsonObject(ByteBuf body, int length) throws BadRequest {
        JsonElement parsed;
        try {
            parsed = JsonParser.parseString(body.toString(0, length, StandardCharsets.UTF_8));
        } catch (JsonParseException e) {
            throw new BadRequest("the request's JSON is not valid: " + e.getMessage());
        }
        if (!parsed.isJsonObject()) {
            throw new BadRequest("an infer request is a JSON object with \"inputs\"");
        }
        return parsed.getAsJsonObject();
    }

    /** The inputs sent as binary data, in order, each size checked against its tensor. */
    private static List<BinaryInput> binaryInputs(JsonObject request) throws BadRequest {
        List<BinaryInput> found = new ArrayList<>();
        JsonElement inputs = request.get("inputs");
        if (inputs == null || !inputs.isJsonArray()) {
            return found;  // the handler says what an infer request must hold
        }
        for (JsonElement element : inputs.getAsJsonArray()) {
            if (!element.isJsonObject() || !object(element.getAsJsonObject(), "parameters").has(SIZE)) {
                continue;
            }
            JsonObject tensor = element.getAsJsonObject();
            JsonElement name = tensor.get("name");
            String what = "input " + (name != null && name.isJsonPrimitive()
                    ? "'" + name.getAsString() + "'" : String.valueOf(name));
            long size = wholeNumber(object(tensor, "parameters").get(SIZE), what + " " + SIZE);
            if (tensor.has("data")) {
                throw new BadRequest(what + " has both " + SIZE + " and \"data\": send one");
            }
            JsonElement type = tensor.get("datatype");
            String datatype = type != null && type.isJsonPrimitive() ? type.getAsString() : null;
            if (datatype == null || !WIDTH.containsKey(datatype)) {
                throw new BadRequest(what + " has datatype " + type + ", which has no binary form");
            }
            long count = elementCount(tensor.get("shape"), what);
            long expected = WIDTH.get(datatype) * count;
            if (WIDTH.get(datatype) > 0 && expected != size) {
                throw new BadRequest(what + " of shape " + tensor.get("shape") + " and datatype "
                        + datatype + " takes " + expected + " bytes, but its " + SIZE + " is " + size);
            }
            JsonArray shape = tensor.getAsJsonArray("shape");
            long rows = shape.size() == 0 ? 0 : shape.get(0).getAsLong();
            found.add(new BinaryInput(what, datatype, rows, count, (int) size));
        }
        return found;
    }

    /** A whole number in [0, Integer.MAX_VALUE], or BadRequest naming the value. */
    private static long wholeNumber(JsonElement value, String what) throws BadRequest {
        if (value != null && value.isJsonPrimitive() && value.getAsJsonPrimitive().isNumber()) {
            BigDecimal number = value.getAsBigDecimal();
            if (number.signum() >= 0 && number.compareTo(BigDecimal.valueOf(Integer.MAX_VALUE)) <= 0
                    && number.stripTrailingZeros().scale() <= 0) {
                return number.longValue();
            }
        }
        throw new BadRequest(what + " must be a whole number >= 0, got " + value);
    }

    private static long elementCount(JsonElement shape, String what) throws BadRequest {
        if (shape == null || !shape.isJsonArray()) {
            throw new BadRequest(what + " shape must be an array of whole numbers >= 0, got " + shape);
        }
        long count = 1;
        for (JsonElement dim : shape.getAsJsonArray()) {
            count = Math.multiplyExact(count, wholeNumber(dim, what + " shape dimension"));
            if (count > Integer.MAX_VALUE) {
                throw new BadRequest(what + " shape " + shape + " is too large");
            }
        }
        return count;
    }

    /**
     * The handler's bounds on one request (kiln.handlers.limits.check_instances and
     * check_request), in its words, from the binary inputs' shapes: refused here, a request
     * over them costs the JVM nothing but its body.
     */
    private static void admit(List<BinaryInput> inputs, RequestLimits limits) throws BadRequest {
        long values = 0;
        for (BinaryInput input : inputs) {
            if (input.rows > limits.maxInstances) {
                throw new BadRequest(413, input.rows + " instances in one request, more than "
                        + limits.maxInstances);
            }
            values += input.count;
        }
        if (values > limits.maxValues) {
            throw new BadRequest(413, values + " input values in one request, more than the "
                    + "limit of " + limits.maxValues + ": send fewer rows");
        }
    }

    /** BYTES data holds exactly its shape's elements, each length within the data. */
    private static void checkBytes(BinaryInput input, ByteBuf bytes) throws BadRequest {
        long elements = 0;
        while (bytes.readableBytes() >= 4 && elements < input.count) {
            long length = bytes.readUnsignedIntLE();
            if (length > bytes.readableBytes()) {
                throw new BadRequest(input.what + " BYTES element " + elements + " is "
                        + length + " bytes long, past the end of its " + SIZE);
            }
            bytes.skipBytes((int) length);
            elements++;
        }
        if (elements != input.count || bytes.isReadable()) {
            throw new BadRequest(input.what + " BYTES data of " + input.size + " bytes does not "
                    + "hold exactly the " + input.count + " elements its shape needs");
        }
    }

    /** Per output named in the request, its binary_data parameter when it has one. */
    private static Map<String, Boolean> binaryOutputs(JsonObject request) {
        Map<String, Boolean> wanted = new HashMap<>();
        JsonElement outputs = request.get("outputs");
        if (outputs == null || !outputs.isJsonArray()) {
            return wanted;
        }
        for (JsonElement element : outputs.getAsJsonArray()) {
            if (!element.isJsonObject()) {
                continue;
            }
            JsonObject output = element.getAsJsonObject();
            JsonElement name = output.get("name");
            JsonElement binary = object(output, "parameters").get("binary_data");
            if (name != null && name.isJsonPrimitive() && binary != null && binary.isJsonPrimitive()
                    && binary.getAsJsonPrimitive().isBoolean()) {
                wanted.put(name.getAsString(), binary.getAsBoolean());
            }
        }
        return wanted;
    }

    // --- the answer -----------------------------------------------------------------------

    /** An output's data in binary form; null for FP16, which Kiln's handler never answers. */
    private static byte[] encode(String datatype, JsonElement data) {
        List<JsonElement> values = new ArrayList<>();
        flatten(data, values);
        if (datatype.equals("BYTES")) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            for (JsonElement value : values) {
                byte[] text = value.getAsString().getBytes(StandardCharsets.UTF_8);
                out.writeBytes(ByteBuffer.allocate(4).order(ByteOrder.LITTLE_ENDIAN)
                        .putInt(text.length).array());
                out.writeBytes(text);
            }
            return out.toByteArray();
        }
        Integer width = WIDTH.get(datatype);
        if (width == null || datatype.equals("FP16")) {
            return null;
        }
        ByteBuffer out = ByteBuffer.allocate(values.size() * width).order(ByteOrder.LITTLE_ENDIAN);
        for (JsonElement value : values) {
            switch (datatype) {
                case "BOOL": out.put((byte) (value.getAsBoolean() ? 1 : 0)); break;
                case "FP32": out.putFloat(value.getAsFloat()); break;
                case "FP64": out.putDouble(value.getAsDouble()); break;
                default: putInteger(out, width, value.getAsBigInteger().longValue());
            }
        }
        return out.array();
    }

    private static void putInteger(ByteBuffer out, int width, long value) {
        switch (width) {
            case 1: out.put((byte) value); break;
            case 2: out.putShort((short) value); break;
            case 4: out.putInt((int) value); break;
            default: out.putLong(value);
        }
    }

    private static void flatten(JsonElement data, List<JsonElement> into) {
        if (data != null && data.isJsonArray()) {
            for (JsonElement element : data.getAsJsonArray()) {
                flatten(element, into);
            }
        } else if (data != null) {
            into.add(data);
        }
    }

    // --- plumbing -------------------------------------------------------------------------

    /** The member that is an object, or an empty object (not added) when there is none. */
    private static JsonObject object(JsonObject parent, String name) {
        JsonElement member = parent.get(name);
        return member != null && member.isJsonObject() ? member.getAsJsonObject() : new JsonObject();
    }

    private static boolean isTrue(JsonObject parent, String name) {
        JsonElement member = parent.get(name);
        return member != null && member.isJsonPrimitive() && member.getAsJsonPrimitive().isBoolean()
                && member.getAsBoolean();
    }

    /** Whether body holds mark; its first byte found by Netty's scan, fast on any buffer. */
    private static boolean contains(ByteBuf body, byte[] mark) {
        int last = body.writerIndex() - mark.length;
        for (int i = body.readerIndex(); i <= last; i++) {
            i = body.indexOf(i, last + 1, mark[0]);
            if (i < 0) {
                return false;
            }
            if (startsWith(body, i, mark)) {
                return true;
            }
        }
        return false;
    }

    private static boolean startsWith(ByteBuf body, int at, byte[] mark) {
        for (int j = 1; j < mark.length; j++) {
            if (body.getByte(at + j) != mark[j]) {
                return false;
            }
        }
        return true;
    }
}
