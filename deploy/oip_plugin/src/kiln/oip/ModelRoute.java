package kiln.oip;

import java.util.List;

/** /v2/models/NAME[/versions/VERSION][/ACTION] taken apart; ACTION is "", "ready" or "infer". */
final class ModelRoute {
    final String name;
    final String version;
    final String action;

    private ModelRoute(String name, String version, String action) {
        this.name = name;
        this.version = version;
        this.action = action;
    }

    /** The route, or null when the path (after /v2) is not a model route. */
    static ModelRoute parse(List<String> path) {
        if (path.size() < 2 || !path.get(0).equals("models")) {
            return null;
        }
        List<String> rest = path.subList(2, path.size());
        String version = null;
        if (rest.size() >= 2 && rest.get(0).equals("versions")) {
            version = rest.get(1);
            rest = rest.subList(2, rest.size());
        }
        if (rest.size() > 1) {
            return null;
        }
        return new ModelRoute(path.get(1), version, rest.isEmpty() ? "" : rest.get(0));
    }

    /** The same route to another version (null: the default one). */
    ModelRoute withVersion(String other) {
        return new ModelRoute(name, other, action);
    }

    String describe() {
        return "'" + name + "'" + (version == null ? "" : " version '" + version + "'");
    }
}
