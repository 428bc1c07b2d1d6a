// Parse LogQL expressions with Grafana's own grammar (the one Grafana's query editor uses).
// stdin: a JSON array of expressions; stdout: a JSON array of {expr, error} (error: null or
// the offset and the text from where the parser gave up).
import { readFileSync } from "node:fs";
import { parser } from "@grafana/lezer-logql";

const results = JSON.parse(readFileSync(0, "utf8")).map((expr) => {
  const tree = parser.parse(expr);
  let error = null;
  tree.iterate({
    enter: (node) => {
      if (error === null && node.type.isError) {
        error = { at: node.from, near: expr.slice(node.from, node.from + 30) };
      }
    },
  });
  return { expr, top: tree.topNode.firstChild?.name ?? null, error };
});
process.stdout.write(JSON.stringify(results));
