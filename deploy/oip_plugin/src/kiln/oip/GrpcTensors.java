package kiln.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import com.google.protobuf.Descriptors.FieldDescriptor;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.InferParameter;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.InferTensorContents;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest.InferInputTensor;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest.InferRequestedOutputTensor;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse.InferOutputTensor;

/**
 * An OIP infer over gRPC as the same infer over HTTP, and back. A ModelInferRequest becomes
 * the body OIP over HTTP carries with the binary tensor extension: a JSON header, then every
 * input's bytes (raw_input_contents as they came; typed contents laid out the same way), every
 * output asked for in binary. It then takes the HTTP route's whole path (routes, shadows, the
 * limits BinaryTensors checks, the handler's own checks), so that both protocols give the same
 * answers and the same errors. The binary answer's outputs become raw_output_contents, as
 * Triton answers and as tritonclient and KServe's client read them.
 */
final class GrpcTensors {

    private static final String SIZE = "binary_data_size";
    // The InferTensorContents field that holds each datatype's values (FP16 has none).
    private static final Map<String, Integer> CONTENTS = Map.ofEntries(
            Map.entry("BOOL", InferTensorContents.BOOL_CONTENTS_FIELD_NUMBER),
            Map.entry("INT8", InferTensorContents.INT_CONTENTS_FIELD_NUMBER),
            Map.entry("INT16", InferTensorContents.INT_CONTENTS_FIELD_NUMBER),
            Map.entry("INT32", InferTensorContents.INT_CONTENTS_FIELD_NUMBER),
            Map.entry("INT64", InferTensorContents.INT64_CONTENTS_FIELD_NUMBER),
            Map.entry("UINT8", InferTensorContents.UINT_CONTENTS_FIELD_NUMBER),
            Map.entry("UINT16", InferTensorContents.UINT_CONTENTS_FIELD_NUMBER),
            Map.entry("UINT32", InferTensorContents.UINT_CONTENTS_FIELD_NUMBER),
            Map.entry("UINT64", InferTensorContents.UINT64_CONTENTS_FIELD_NUMBER),
            Map.entry("FP32", InferTensorContents.FP32_CONTENTS_FIELD_NUMBER),
            Map.entry("FP64", InferTensorContents.FP64_CONTENTS_FIELD_NUMBER),
            Map.entry("BYTES", InferTensorContents.BYTES_CONTENTS_FIELD_NUMBER));

    /** An HTTP infer body: the JSON header and the tensors' bytes after it. */
    static final class Body {
        final ByteBuf bytes;
        final int jsonLength;

        private Body(ByteBuf bytes, int jsonLength) {
            this.bytes = bytes;
            this.jsonLength = jsonLength;
        }
    }

    private GrpcTensors() {}

    /** The request as OIP over HTTP with binary tensors; BadRequest (400) when malformed. */
    static Body request(ModelInferRequest request) throws BinaryTensors.BadRequest {
        int raw = request.getRawInputContentsCount();
        if (raw > 0 && raw != request.getInputsCount()) {
            throw new BinaryTensors.BadRequest("the request has " + request.getInputsCount()
                    + " inputs and " + raw + " raw_input_contents: send one per input, or none");
        }
        List<ByteBuffer> data = new ArrayList<>();
        JsonArray inputs = new JsonArray();
        for (int i = 0; i < request.getInputsCount(); i++) {
            InferInputTensor input = request.getInputs(i);
            String what = "input '" + input.getName() + "'";
            if (raw > 0 && input.hasContents()) {
                throw new BinaryTensors.BadRequest(what + " has contents, and the request has "
                        + "raw_input_contents: send every input one way");
            }
            ByteBuffer bytes = raw > 0 ? request.getRawInputContents(i).asReadOnlyByteBuffer()
                    : typed(input, what);
            JsonObject tensor = new JsonObject();
            tensor.addProperty("name", input.getName());
            tensor.addProperty("datatype", input.getDatatype());
            tensor.add("shape", shape(input.getShapeList()));
            JsonObject parameters = parameters(input.getParametersMap());
            parameters.addProperty(SIZE, bytes.remaining());
            tensor.add("parameters", parameters);
            inputs.add(tensor);
            data.add(bytes);
        }
        byte[] header = header(request, inputs).toString().getBytes(StandardCharsets.UTF_8);
        data.add(0, ByteBuffer.wrap(header));
        // Wrapped, not copied: the route copies the body once, when it queues it.
        return new Body(Unpooled.wrappedBuffer(data.toArray(new ByteBuffer[0])), header.length);
    }

    private static JsonObject header(ModelInferRequest request, JsonArray inputs) {
        JsonObject header = new JsonObject();
        if (!request.getId().isEmpty()) {
            header.addProperty("id", request.getId());
        }
        JsonObject parameters = parameters(request.getParametersMap());
        parameters.addProperty("binary_data_output", true);
        header.add("parameters", parameters);
        header.add("inputs", inputs);
        if (request.getOutputsCount() > 0) {
            JsonArray outputs = new JsonArray();
            for (InferRequestedOutputTensor wanted : request.getOutputsList()) {
                JsonObject output = new JsonObject();
                output.addProperty("name", wanted.getName());
                JsonObject asked = parameters(wanted.getParametersMap());
                asked.addProperty("binary_data", true);  // every answer is raw_output_contents
                output.add("parameters", asked);
                outputs.add(output);
            }
            header.add("outputs", outputs);
        }
        return header;
    }

    /** A tensor's typed contents laid out as its raw bytes (little-endian, row-major). */
    private static ByteBuffer typed(InferInputTensor input, String what)
            throws BinaryTensors.BadRequest {
        String datatype = input.getDatatype();
        Integer field = CONTENTS.get(datatype);
        if (field == null) {
            throw new BinaryTensors.BadRequest(what + " has datatype '" + datatype
                    + "', which has no typed contents: send its bytes in raw_input_contents");
        }
        InferTensorContents contents = input.getContents();
        for (FieldDescriptor given : contents.getAllFields().keySet()) {
            if (given.getNumber() != field) {
                throw new BinaryTensors.BadRequest(what + " is " + datatype + ": its values go in "
                        + InferTensorContents.getDescriptor().findFieldByNumber(field).getName()
                        + ", not " + given.getName());
            }
        }
        FieldDescriptor values = InferTensorContents.getDescriptor().findFieldByNumber(field);
        int count = contents.getRepeatedFieldCount(values);
        long expected = elements(input.getShapeList());
        if (expected >= 0 && expected != count) {
            throw new BinaryTensors.BadRequest(what + " of shape " + input.getShapeList()
                    + " takes " + expected + " values, but its contents hold " + count);
        }
        return layout(datatype, contents, what);
    }

    private static ByteBuffer layout(String datatype, InferTensorContents c, String what)
            throws BinaryTensors.BadRequest {
        switch (datatype) {
            case "BOOL": {
                ByteBuffer out = buffer(c.getBoolContentsCount());
                c.getBoolContentsList().forEach(v -> out.put((byte) (v ? 1 : 0)));
                return out.flip();
            }
            case "INT8": case "INT16": case "UINT8": case "UINT16":
                return narrow(datatype, datatype.startsWith("U") ? c.getUintContentsList()
                        : c.getIntContentsList(), what);
            case "INT32": case "UINT32": {
                List<Integer> ints = datatype.equals("INT32") ? c.getIntContentsList()
                        : c.getUintContentsList();
                ByteBuffer out = buffer(4L * ints.size());
                ints.forEach(out::putInt);
                return out.flip();
            }
            case "INT64": case "UINT64": {
                List<Long> longs = datatype.equals("INT64") ? c.getInt64ContentsList()
                        : c.getUint64ContentsList();
                ByteBuffer out = buffer(8L * longs.size());
                longs.forEach(out::putLong);
                return out.flip();
            }
            case "FP32": {
                ByteBuffer out = buffer(4L * c.getFp32ContentsCount());
                c.getFp32ContentsList().forEach(out::putFloat);
                return out.flip();
            }
            case "FP64": {
                ByteBuffer out = buffer(8L * c.getFp64ContentsCount());
                c.getFp64ContentsList().forEach(out::putDouble);
                return out.flip();
            }
            default: {  // BYTES: each element its length, then itself
                long size = 0;
                for (ByteString element : c.getBytesContentsList()) {
                    size += 4 + element.size();
                }
                ByteBuffer out = buffer(size);
                for (ByteString element : c.getBytesContentsList()) {
                    out.putInt(element.size());
                    element.copyTo(out);
                }
                return out.flip();
            }
        }
    }

    /** 8- and 16-bit values, which travel as 32-bit ones, each checked to fit. */
    private static ByteBuffer narrow(String datatype, List<Integer> values, String what)
            throws BinaryTensors.BadRequest {
        boolean unsigned = datatype.startsWith("U");
        int bits = datatype.endsWith("8") ? 8 : 16;
        long min = unsigned ? 0 : -(1L << (bits - 1));
        long max = unsigned ? (1L << bits) - 1 : (1L << (bits - 1)) - 1;
        ByteBuffer out = buffer((long) values.size() * bits / 8);
        for (int value : values) {
            long v = unsigned ? Integer.toUnsignedLong(value) : value;
            if (v < min || v > max) {
                throw new BinaryTensors.BadRequest(what + " holds " + v + ", outside " + datatype
                        + "'s range [" + min + ", " + max + "]");
            }
            if (bits == 8) {
                out.put((byte) v);
            } else {
                out.putShort((short) v);
            }
        }
        return out.flip();
    }

    /** A little-endian buffer, within the message size gRPC already admitted. */
    private static ByteBuffer buffer(long size) {
        return ByteBuffer.allocate(Math.toIntExact(size)).order(ByteOrder.LITTLE_ENDIAN);
    }

    /** The elements a shape holds; -1 when it holds no count (BinaryTensors says why). */
    private static long elements(List<Long> shape) {
        long count = 1;
        for (long dim : shape) {
            if (dim < 0 || (dim > 0 && count > Integer.MAX_VALUE / dim)) {
                return -1;
            }
            count *= dim;
        }
        return count;
    }

    private static JsonArray shape(List<Long> dims) {
        JsonArray shape = new JsonArray();
        dims.forEach(shape::add);
        return shape;
    }

    private static JsonObject parameters(Map<String, InferParameter> given) {
        JsonObject parameters = new JsonObject();
        given.forEach((name, value) -> {
            switch (value.getParameterChoiceCase()) {
                case BOOL_PARAM: parameters.addProperty(name, value.getBoolParam()); break;
                case INT64_PARAM: parameters.addProperty(name, value.getInt64Param()); break;
                case STRING_PARAM: parameters.addProperty(name, value.getStringParam()); break;
                default: break;  // none set: as a parameter not sent
            }
        });
        return parameters;
    }

    // --- the answer ---------------------------------------------------------------------

    /** The HTTP route's 200 answer (JSON header, then its outputs' bytes) as gRPC's. */
    static ModelInferResponse response(Reply reply) {
        String header = reply.headers.get(BinaryTensors.HEADER);
        int jsonLength = header == null ? reply.body.length : Integer.parseInt(header);
        JsonObject json = JsonParser.parseString(
                new String(reply.body, 0, jsonLength, StandardCharsets.UTF_8)).getAsJsonObject();
        ModelInferResponse.Builder out = ModelInferResponse.newBuilder()
                .setModelName(json.get("model_name").getAsString());
        if (json.has("model_version")) {
            out.setModelVersion(json.get("model_version").getAsString());
        }
        if (json.has("id")) {
            out.setId(json.get("id").getAsString());
        }
        int offset = jsonLength;
        for (JsonElement element : json.getAsJsonArray("outputs")) {
            JsonObject output = element.getAsJsonObject();
            InferOutputTensor.Builder tensor = InferOutputTensor.newBuilder()
                    .setName(output.get("name").getAsString())
                    .setDatatype(output.get("datatype").getAsString());
            output.getAsJsonArray("shape").forEach(dim -> tensor.addShape(dim.getAsLong()));
            // Every output was asked for in binary, and Kiln answers none that has no
            // binary form (FP16): each has its size.
            int size = output.getAsJsonObject("parameters").get(SIZE).getAsInt();
            out.addOutputs(tensor).addRawOutputContents(ByteString.copyFrom(reply.body, offset, size));
            offset += size;
        }
        return out.build();
    }
}
