#!/usr/bin/env python3
"""Generate the FHIR R4 (4.0.1) tables that the server's validator embeds.

Source: HL7's FHIR R4 specification (CC0), as packaged on Maven Central in
ca.uhn.hapi.fhir:hapi-fhir-validation-resources-r4:8.12.1. The jar contains the
spec's definition bundles under org/hl7/fhir/r4/model/:
profile/profiles-types.xml, profile/profiles-resources.xml,
valueset/valuesets.xml, valueset/v3-codesystems.xml and sp/search-parameters.json.

Rerun (Python 3.11, standard library only):

    mvn dependency:get -Dartifact=ca.uhn.hapi.fhir:hapi-fhir-validation-resources-r4:8.12.1
    python3 schemas/fhir-r4/generate.py \
        ~/.m2/repository/ca/uhn/hapi/fhir/hapi-fhir-validation-resources-r4/8.12.1/hapi-fhir-validation-resources-r4-8.12.1.jar

It writes, next to this script:

- definitions.json: every resource type, complex datatype and backbone element
  of R4 with its elements, the codes of each value set that a `code` element
  binds with required strength (where the spec enumerates them), and the list of
  resource types. An element row has `name` (with `[x]` for a choice), `min`
  (omitted when 0), `max` (omitted when "1") and `types`. A type is a
  datatype, a primitive, `Resource`, or the path of a backbone element such as
  `Patient.contact`. Optional `targets` lists the resource types a Reference
  may point at, and optional `valueSet` names a required value set.
- compartment-patient.json: for each resource type in the Patient compartment,
  the element paths whose reference places a resource in a patient's
  compartment.
"""

import json
import sys
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

ARTIFACT = "ca.uhn.hapi.fhir:hapi-fhir-validation-resources-r4:8.12.1"
MODEL = "org/hl7/fhir/r4/model/"
FHIR_NS = {"f": "http://hl7.org/fhir"}
SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
FHIRPATH_PREFIX = "http://hl7.org/fhirpath/System."
FHIR_TYPE_EXTENSION = SD_PREFIX + "structuredefinition-fhir-type"
OUT_DIR = Path(__file__).resolve().parent

# Quantity profiles that base resources put on element types. The generator
# emits them as types of their own, so the validator can apply their limits.
QUANTITY_PROFILES = {"SimpleQuantity", "MoneyQuantity"}


def value_of(element, name):
    """Return the `value` attribute of the named FHIR child, or None."""
    child = element.find("f:" + name, FHIR_NS)
    return None if child is None else child.get("value")


def values_of(element, name):
    return [child.get("value") for child in element.findall("f:" + name, FHIR_NS)]


def resources_in(archive, member, tag):
    """Yield every resource with the given tag in a bundle inside the jar."""
    with archive.open(MODEL + member) as stream:
        root = ET.parse(stream).getroot()
    yield from root.findall("f:entry/f:resource/f:" + tag, FHIR_NS)


# Structure definitions


def type_name(type_element, element_path, resource_name):
    """Name the type of one `type` entry the way the tables spell it."""
    code = value_of(type_element, "code")
    if code.startswith(FHIRPATH_PREFIX):
        # Element.id, Extension.url and the primitive `value` elements carry a
        # FHIRPath system type. The extension names the FHIR type it stands for.
        fhir_type = None
        for extension in type_element.findall("f:extension", FHIR_NS):
            if extension.get("url") == FHIR_TYPE_EXTENSION:
                fhir_type = value_of(extension, "valueUrl") or value_of(extension, "valueString")
        if fhir_type is None:
            raise ValueError(f"{element_path}: system type {code} without a FHIR type")
        code = fhir_type
        # R4's XML schema (fhir-base.xsd in the same jar) types Resource.id as
        # `id`, but the snapshot types it as a plain string. The tables follow
        # the schema, so resource ids get the id format check.
        if resource_name is not None and element_path == resource_name + ".id":
            code = "id"
    for profile in values_of(type_element, "profile"):
        name = profile.removeprefix(SD_PREFIX)
        if code == "Quantity" and name in QUANTITY_PROFILES:
            return name
    return code


def element_entry(element, resource_name):
    """Build the table entry of one snapshot element (resource_name is None in datatypes)."""
    path = value_of(element, "path")
    name = path.rsplit(".", 1)[1]
    entry = {"name": name}
    minimum = int(value_of(element, "min"))
    maximum = value_of(element, "max")
    if minimum != 0:
        entry["min"] = minimum
    if maximum != "1":
        entry["max"] = maximum

    content_reference = value_of(element, "contentReference")
    if content_reference is not None:
        entry["types"] = [content_reference.removeprefix("#")]
        return entry

    types = []
    targets = []
    for type_element in element.findall("f:type", FHIR_NS):
        name_of_type = type_name(type_element, path, resource_name)
        if name_of_type in ("Element", "BackboneElement"):
            name_of_type = path
        types.append(name_of_type)
        if name_of_type == "Reference":
            for profile in values_of(type_element, "targetProfile"):
                targets.append(profile.removeprefix(SD_PREFIX))
    entry["types"] = types
    if targets:
        entry["targets"] = targets

    binding = element.find("f:binding", FHIR_NS)
    if binding is not None and types == ["code"] and value_of(binding, "strength") == "required":
        value_set = value_of(binding, "valueSet")
        if value_set is not None:
            entry["valueSet"] = value_set.split("|", 1)[0]
    return entry


def load_structures(archive):
    """Collect every base type's elements, grouped by the owning type or backbone path."""
    types = {}
    resource_types = []
    primitive_types = []
    for member in ("profile/profiles-types.xml", "profile/profiles-resources.xml"):
        for definition in resources_in(archive, member, "StructureDefinition"):
            kind = value_of(definition, "kind")
            name = value_of(definition, "name")
            derivation = value_of(definition, "derivation")
            if kind == "logical":
                continue
            if derivation == "constraint" and name not in QUANTITY_PROFILES:
                continue
            if kind == "primitive-type":
                primitive_types.append(name)
                continue
            if kind == "resource" and value_of(definition, "abstract") != "true":
                resource_types.append(name)
            if name in ("Element", "BackboneElement", "Resource", "DomainResource"):
                continue
            snapshot = definition.find("f:snapshot", FHIR_NS)
            root_path = value_of(definition, "type")
            for element in snapshot.findall("f:element", FHIR_NS):
                path = value_of(element, "path")
                if path == root_path:
                    continue
                if derivation == "constraint" and value_of(element, "max") == "0":
                    continue
                owner = name + path[len(root_path):].rsplit(".", 1)[0]
                resource_name = root_path if kind == "resource" else None
                types.setdefault(owner, []).append(element_entry(element, resource_name))
    return types, sorted(resource_types), sorted(primitive_types)


# Value sets


class CodeSystems:
    """The code systems of the spec, each as the list of its codes in order."""

    def __init__(self):
        self.codes = {}
        self.parents = {}

    def add(self, code_system):
        url = value_of(code_system, "url")
        codes = []
        parents = {}

        def walk(concepts, parent):
            for concept in concepts:
                code = value_of(concept, "code")
                codes.append(code)
                parents.setdefault(code, set())
                if parent is not None:
                    parents[code].add(parent)
                walk(concept.findall("f:concept", FHIR_NS), code)

        walk(code_system.findall("f:concept", FHIR_NS), None)
        if value_of(code_system, "content") == "complete" and codes:
            self.codes[url] = codes
            self.parents[url] = parents

    def descendants(self, system, code):
        """Return the codes below `code` in the system's hierarchy, without `code`."""
        parents = self.parents[system]
        found = []
        for candidate in self.codes[system]:
            stack = list(parents.get(candidate, ()))
            seen = set()
            while stack:
                ancestor = stack.pop()
                if ancestor == code:
                    found.append(candidate)
                    break
                if ancestor not in seen:
                    seen.add(ancestor)
                    stack.extend(parents.get(ancestor, ()))
        return found


class NotEnumerable(Exception):
    """Raised when a value set depends on content the spec does not list."""


def expand(url, value_sets, code_systems, active=()):
    """Return the codes of a value set, in the order the spec lists them."""
    if url in active:
        raise NotEnumerable(f"{url} includes itself")
    value_set = value_sets.get(url)
    if value_set is None:
        raise NotEnumerable(f"value set {url} is not in the spec")
    compose = value_set.find("f:compose", FHIR_NS)
    if compose is None:
        raise NotEnumerable(f"value set {url} has no compose")

    def part_codes(part):
        system = value_of(part, "system")
        selected = None
        if system is not None:
            listed = values_of_path(part, "concept", "code")
            filters = part.findall("f:filter", FHIR_NS)
            if listed:
                selected = listed
            elif filters:
                if system not in code_systems.codes:
                    raise NotEnumerable(f"code system {system} is not in the spec")
                selected = None
                for filter_element in filters:
                    matches = filter_codes(system, filter_element, code_systems)
                    selected = matches if selected is None else [c for c in selected if c in matches]
            else:
                if system not in code_systems.codes:
                    raise NotEnumerable(f"code system {system} is not in the spec")
                selected = list(code_systems.codes[system])
        for nested in values_of(part, "valueSet"):
            nested_codes = expand(nested.split("|", 1)[0], value_sets, code_systems, (*active, url))
            selected = nested_codes if selected is None else [c for c in selected if c in nested_codes]
        return selected or []

    codes = []
    for include in compose.findall("f:include", FHIR_NS):
        for code in part_codes(include):
            if code not in codes:
                codes.append(code)
    for exclude in compose.findall("f:exclude", FHIR_NS):
        excluded = set(part_codes(exclude))
        codes = [code for code in codes if code not in excluded]
    if not codes:
        raise NotEnumerable(f"value set {url} expands to no code")
    return codes


def values_of_path(element, child, name):
    return [value_of(node, name) for node in element.findall("f:" + child, FHIR_NS)]


def filter_codes(system, filter_element, code_systems):
    operator = value_of(filter_element, "op")
    property_name = value_of(filter_element, "property")
    code = value_of(filter_element, "value")
    if property_name != "concept":
        raise NotEnumerable(f"filter on property {property_name} of {system}")
    below = code_systems.descendants(system, code)
    if operator == "is-a":
        return [code, *below]
    if operator == "descendent-of":
        return below
    raise NotEnumerable(f"filter operator {operator} on {system}")


def load_value_sets(archive):
    value_sets = {}
    code_systems = CodeSystems()
    for member in ("valueset/valuesets.xml", "valueset/v3-codesystems.xml"):
        for code_system in resources_in(archive, member, "CodeSystem"):
            code_systems.add(code_system)
        for value_set in resources_in(archive, member, "ValueSet"):
            value_sets[value_of(value_set, "url")] = value_set
    return value_sets, code_systems


# Patient compartment


def strip_parentheses(text):
    text = text.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    return text


def load_patient_compartment(archive, types):
    """Join the compartment's parameter names with the search parameters' expressions."""
    with archive.open(MODEL + "sp/search-parameters.json") as stream:
        search_bundle = json.load(stream)
    expressions = {}
    for entry in search_bundle["entry"]:
        parameter = entry["resource"]
        for base in parameter.get("base", []):
            expressions[(base, parameter["code"])] = parameter.get("expression", "")

    compartment = None
    for definition in resources_in(archive, "profile/profiles-resources.xml", "CompartmentDefinition"):
        if value_of(definition, "code") == "Patient":
            compartment = definition
    if compartment is None:
        raise ValueError("the jar has no Patient compartment definition")

    paths_by_type = {}
    for resource in compartment.findall("f:resource", FHIR_NS):
        resource_type = value_of(resource, "code")
        paths = []
        for parameter in values_of(resource, "param"):
            expression = expressions.get((resource_type, parameter))
            if expression is None:
                raise ValueError(f"no search parameter {parameter} on {resource_type}")
            for part in expression.split("|"):
                part = strip_parentheses(part)
                if not part.startswith(resource_type + "."):
                    continue
                part = part.removesuffix(".where(resolve() is Patient)")
                path = part[len(resource_type) + 1 :]
                if not all(segment.isidentifier() for segment in path.split(".")):
                    raise ValueError(f"{resource_type}.{parameter}: cannot read path {part}")
                check_reference_path(types, resource_type, path)
                if path not in paths:
                    paths.append(path)
        if paths:
            paths_by_type[resource_type] = paths
    return paths_by_type


def check_reference_path(types, resource_type, path):
    """Fail unless the path walks existing elements and ends at a Reference."""
    owner = resource_type
    segments = path.split(".")
    for index, segment in enumerate(segments):
        element = next((e for e in types[owner] if e["name"] == segment), None)
        if element is None:
            raise ValueError(f"{resource_type}.{path}: no element {segment}")
        if index == len(segments) - 1:
            if element["types"] != ["Reference"]:
                raise ValueError(f"{resource_type}.{path} is not a Reference")
        else:
            owner = element["types"][0]


# Output


def write_json(path, document):
    """Write JSON with one top-level member, or one table row, per line."""
    lines = ["{"]
    members = list(document.items())
    for index, (key, value) in enumerate(members):
        comma = "," if index < len(members) - 1 else ""
        if isinstance(value, dict):
            lines.append(f"{json.dumps(key)}: {{")
            rows = list(value.items())
            for row_index, (row_key, row_value) in enumerate(rows):
                row_comma = "," if row_index < len(rows) - 1 else ""
                compact = json.dumps(row_value, separators=(",", ":"), ensure_ascii=False)
                lines.append(f"{json.dumps(row_key)}: {compact}{row_comma}")
            lines.append("}" + comma)
        else:
            compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            lines.append(f"{json.dumps(key)}: {compact}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: generate.py PATH/TO/hapi-fhir-validation-resources-r4-VERSION.jar")
    with zipfile.ZipFile(sys.argv[1]) as archive:
        types, resource_types, primitive_types = load_structures(archive)
        value_sets, code_systems = load_value_sets(archive)
        compartment = load_patient_compartment(archive, types)

    bound = {}
    skipped = {}
    for owner, elements in types.items():
        for element in elements:
            url = element.get("valueSet")
            if url is None or url in bound or url in skipped:
                continue
            try:
                bound[url] = expand(url, value_sets, code_systems)
            except NotEnumerable as reason:
                skipped[url] = str(reason)
    for owner, elements in types.items():
        for element in elements:
            if element.get("valueSet") in skipped:
                del element["valueSet"]
    for url, reason in sorted(skipped.items()):
        print(f"no code list for {url}: {reason}", file=sys.stderr)

    definitions = {
        "fhirVersion": "4.0.1",
        "source": ARTIFACT,
        "resourceTypes": resource_types,
        "primitiveTypes": primitive_types,
        "types": dict(sorted(types.items())),
        "valueSets": dict(sorted(bound.items())),
    }
    write_json(OUT_DIR / "definitions.json", definitions)
    write_json(
        OUT_DIR / "compartment-patient.json",
        {"fhirVersion": "4.0.1", "source": ARTIFACT, "paths": dict(sorted(compartment.items()))},
    )


if __name__ == "__main__":
    main()
