// The gradeflow console: reads the worker's /api/* with the bearer token the user gives, refreshes every few seconds.
"use strict";
(function () {
  var TOKEN_KEY = "gradeflow-token";
  var REFRESH_MS = 3000;
  var main = document.getElementById("main");
  var statusLine = document.getElementById("status");
  var timer = null;
  var filters = { severity: "", ladder: "", kind: "" };
  var ladderNames = [];

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  // Builds elements from text only: nothing from the API is ever parsed as HTML.
  function h(tag, attrs) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { el.textContent = attrs[k]; }
      else if (k === "on") { Object.keys(attrs.on).forEach(function (e) { el.addEventListener(e, attrs.on[e]); }); }
      else if (attrs[k] !== null && attrs[k] !== undefined) { el.setAttribute(k, attrs[k]); }
    });
    function add(c) {
      if (c === null || c === undefined) return;
      if (Array.isArray(c)) { c.forEach(add); return; }
      el.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    for (var i = 2; i < arguments.length; i++) add(arguments[i]);
    return el;
  }

  function Unauthorized() {}

  function api(path) {
    var headers = {};
    if (token()) headers.Authorization = "Bearer " + token();
    return fetch(path, { headers: headers, cache: "no-store" }).then(function (r) {
      if (r.status === 401) throw new Unauthorized();
      return r.json().then(function (body) {
        if (!r.ok && r.status !== 404) throw new Error(body.error || ("HTTP " + r.status));
        return { status: r.status, body: body };
      });
    });
  }

  function customerLink(id) { return h("a", { href: "#/customer/" + encodeURIComponent(id), "class": "customer" }, id); }
  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 16) : "\u2014"; }
  function show(nodes) { main.replaceChildren.apply(main, [].concat(nodes)); }

  function login(message) {
    stop();
    document.getElementById("logout").hidden = true;
    var input = h("input", { id: "token", type: "password", placeholder: "API token", autocomplete: "current-password" });
    show(h("section", { "class": "card login", id: "login" },
      h("h1", { text: "Sign in" }),
      h("p", { "class": message ? "error" : "muted", id: "login-message",
               text: message || "This worker asks for its API token (GRADEFLOW_API_TOKEN)." }),
      h("form", { on: { submit: function (e) {
        e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value); route();
      } } }, input, h("button", { type: "submit", text: "Open" }))));
    input.focus();
  }

  // Overview

  function matrix(ladder, moves, id) {
    var rows = ["-"].concat(ladder.grades), cells = {};
    moves.forEach(function (m) { cells[m.from + ">" + m.to] = m.n; });
    var total = moves.reduce(function (a, m) { return a + m.n; }, 0);
    var head = h("tr", {}, h("th", { text: "from \\ to" }), ladder.grades.map(function (g) { return h("th", { "class": "num", text: g }); }));
    var body = rows.map(function (from) {
      return h("tr", {}, h("th", { text: from === "-" ? "new" : from }), ladder.grades.map(function (to) {
        var n = cells[from + ">" + to] || 0;
        return h("td", { "class": "num" + (n ? "" : " zero") + (from === to ? " diag" : ""),
                         "data-from": from, "data-to": to, text: String(n) });
      }));
    });
    return h("div", {}, h("table", { "class": "matrix", id: id, "data-total": String(total) }, h("thead", {}, head), h("tbody", {}, body)),
      h("p", { "class": "muted", text: total + " change" + (total === 1 ? "" : "s") }));
  }

  function ratesChart(rates) {
    var causes = {}, max = 1;
    rates.forEach(function (r) {
      var sum = 0;
      Object.keys(r.causes).forEach(function (c) { causes[c] = (causes[c] || 0) + r.causes[c]; sum += r.causes[c]; });
      max = Math.max(max, sum);
    });
    var colors = { transaction: "#2855d8", interaction: "#7a5af8", clock: "#c2410c", rules: "#138a4b" };
    var W = 600, H = 120, bw = W / rates.length;
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + (H + 14)); svg.setAttribute("width", "100%"); svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "grade changes per minute by cause, last hour");
    rates.forEach(function (r, i) {
      var y = H;
      Object.keys(r.causes).sort().forEach(function (c) {
        var hgt = r.causes[c] / max * (H - 4);
        var rect = document.createElementNS(svg.namespaceURI, "rect");
        rect.setAttribute("x", String(i * bw + 0.5)); rect.setAttribute("width", String(Math.max(1, bw - 1)));
        rect.setAttribute("y", String(y - hgt)); rect.setAttribute("height", String(hgt));
        rect.setAttribute("fill", colors[c] || "#667085");
        var title = document.createElementNS(svg.namespaceURI, "title");
        title.textContent = when(r.minute) + " UTC: " + r.causes[c] + " " + c; rect.appendChild(title);
        svg.appendChild(rect); y -= hgt;
      });
    });
    [["-60 min", 0, "start"], ["now", W, "end"], ["max " + max + "/min", W, "end"]].forEach(function (t, i) {
      var text = document.createElementNS(svg.namespaceURI, "text");
      text.setAttribute("x", String(t[1])); text.setAttribute("y", String(i === 2 ? 10 : H + 12));
      text.setAttribute("text-anchor", t[2]); text.textContent = t[0]; svg.appendChild(text);
    });
    var legend = h("table", { id: "causes" }, h("tbody", {}, Object.keys(causes).sort().map(function (c) {
      return h("tr", {}, h("td", {}, h("span", { style: "color:" + (colors[c] || "#667085") }, "\u25a0 "), c),
               h("td", { "class": "num", "data-cause": c, text: String(causes[c]) }));
    })));
    return [svg, Object.keys(causes).length ? legend : h("p", { "class": "muted", text: "No grade change in the last hour." })];
  }

  function overview() {
    return api("/api/overview").then(function (res) {
      var d = res.body;
      ladderNames = d.ladders.map(function (l) { return l.name; });
      var cards = d.ladders.map(function (lad) {
        var total = lad.grades.reduce(function (a, g) { return a + lad.counts[g]; }, 0) || 1;
        return h("section", { "class": "card ladder", "data-ladder": lad.name },
          h("h2", {}, "Ladder ", lad.name),
          h("table", { "class": "counts" }, h("tbody", {}, lad.grades.map(function (g) {
            return h("tr", {}, h("th", {}, g, lad.key.indexOf(g) >= 0 ? h("span", { "class": "muted", text: " key" }) : null),
              h("td", { "class": "num count", "data-ladder": lad.name, "data-grade": g, text: String(lad.counts[g]) }),
              h("td", { style: "width:50%" }, h("div", { "class": "bar", style: "width:" + (100 * lad.counts[g] / total).toFixed(1) + "%" })));
          }))),
          h("h2", { style: "margin-top:1rem" }, "Moves, last hour"), matrix(lad, lad.moves.hour, "moves-hour-" + lad.name),
          h("h2", {}, "Moves, last day"), matrix(lad, lad.moves.day, "moves-day-" + lad.name));
      });
      var dead = Object.keys(d.dead_letters).sort();
      show([h("h1", {}, "Overview ", h("span", { "class": "muted", id: "ruleset", text: "ruleset " + d.ruleset.id + "@" + d.ruleset.version })),
        h("div", { "class": "grid" }, cards,
          h("section", { "class": "card" }, h("h2", { text: "Grade changes per minute, by cause" }), ratesChart(d.changes_per_minute)),
          h("section", { "class": "card" }, h("h2", { text: "Dead letters by reason" }),
            dead.length ? h("table", { id: "dead" }, h("tbody", {}, dead.map(function (r) {
              return h("tr", {}, h("td", { text: r }), h("td", { "class": "num", "data-reason": r, text: String(d.dead_letters[r]) }));
            }))) : h("p", { "class": "muted", text: "None." })),
          h("section", { "class": "card" }, h("h2", { text: "Consumer lag (this worker)" }),
            h("p", {}, h("strong", { id: "lag-total", text: String(d.lag.total) }), " records behind on ", String(d.lag.partitions.length), " partitions")))]);
    });
  }

  // Alerts

  function select(name, values, label) {
    return h("label", {}, label + " ", h("select", { id: "filter-" + name, on: { change: function (e) { filters[name] = e.target.value; route(); } } },
      [""].concat(values).map(function (v) {
        var o = h("option", { value: v, text: v || "all" }); if (v === filters[name]) o.setAttribute("selected", ""); return o;
      })));
  }

  function alerts() {
    var q = ["limit=200"];
    Object.keys(filters).forEach(function (k) { if (filters[k]) q.push(k + "=" + encodeURIComponent(filters[k])); });
    var ladders = ladderNames.length ? Promise.resolve() : api("/api/overview").then(function (r) { ladderNames = r.body.ladders.map(function (l) { return l.name; }); });
    return ladders.then(function () { return api("/api/alerts?" + q.join("&")); }).then(function (res) {
      var list = res.body.alerts;
      show([h("h1", { text: "Alerts" }),
        h("div", { "class": "filters" }, select("severity", ["critical", "warning", "info"], "Severity"),
          select("ladder", ladderNames, "Ladder"), select("kind", ["downgrade", "at_risk"], "Kind")),
        h("section", { "class": "card" }, list.length ? h("table", { id: "alerts" },
          h("thead", {}, h("tr", {}, ["As of", "Severity", "Customer", "Ladder", "Change", "Summary"].map(function (t, i) {
            return h("th", { "class": i === 5 ? "wide-only" : null, text: t }); }))),
          h("tbody", {}, list.map(function (a) {
            return h("tr", { "class": "alert", "data-alert-id": a.alert_id, "data-kind": a.kind },
              h("td", { text: when(a.as_of) }), h("td", {}, h("span", { "class": "pill sev-" + a.severity, text: a.severity })),
              h("td", {}, customerLink(a.customer_id)), h("td", { text: a.ladder }),
              h("td", {}, (a.previous_grade || "\u2014") + " \u2192 " + a.grade, a.kind === "at_risk" ? h("span", { "class": "muted", text: " (at risk, " + when(a.due_at) + ")" }) : null),
              h("td", { "class": "wide-only muted", text: a.summary }));
          }))) : h("p", { "class": "muted", text: "No alert matches." }))]);
    });
  }

  // At risk

  function atRisk() {
    return api("/api/at-risk?limit=200").then(function (res) {
      var list = res.body.customers;
      show([h("h1", {}, "At risk ", h("span", { "class": "muted", text: res.body.clock ? "clock at " + when(res.body.clock) : "" })),
        h("section", { "class": "card" }, list.length ? h("table", { id: "at-risk" },
          h("thead", {}, h("tr", {}, ["Drop on", "Customer", "Ladder", "Change", "What keeps the grade"].map(function (t) { return h("th", { text: t }); }))),
          h("tbody", {}, list.map(function (a) {
            return h("tr", { "class": "at-risk" }, h("td", { text: when(a.due_at) }), h("td", {}, customerLink(a.customer_id)),
              h("td", { text: a.ladder }), h("td", { text: a.previous_grade + " \u2192 " + a.grade }), h("td", { "class": "keep", text: a.keep }));
          }))) : h("p", { "class": "muted", text: "No key customer is at risk within the horizon." }))]);
    });
  }

  // Customer

  function customer(id) {
    return Promise.all([api("/customers/" + encodeURIComponent(id)), api("/api/customers/" + encodeURIComponent(id) + "/timeline")]).then(function (rs) {
      var grades = rs[0].body, tl = rs[1].body;
      if (rs[0].status === 404 && rs[1].status === 404) {
        show([h("h1", {}, "Customer ", id), h("p", { "class": "muted", id: "not-found", text: "No grade known for this customer." })]);
        return;
      }
      var ladders = Object.keys(grades.grades || {});
      Object.keys(tl.current || {}).forEach(function (l) { if (ladders.indexOf(l) < 0) ladders.push(l); });
      var cards = ladders.sort().map(function (l) {
        var g = (grades.grades || {})[l] || {}, cur = (tl.current || {})[l] || {}, m = g.metrics || {};
        return h("section", { "class": "card", "data-ladder": l }, h("h2", {}, "Ladder ", l, ": ",
            h("span", { "class": "grade", "data-ladder": l, text: g.grade || cur.grade })),
          h("div", { "class": "kv" }, h("span", { "class": "muted", text: "as of" }), h("span", { text: when(g.as_of || cur.as_of) }),
            Object.keys(m).filter(function (k) { return typeof m[k] !== "object"; }).map(function (k) {
              return [h("span", { "class": "muted", text: k }), h("span", { text: String(m[k]) })]; })),
          (cur.reasons || []).length ? h("ul", { "class": "reasons" }, cur.reasons.map(function (r) { return h("li", { text: r }); })) : null);
      });
      var changes = tl.changes || [];
      show([h("h1", {}, "Customer ", h("span", { id: "customer-id", text: id })),
        h("p", { "class": "muted", id: "next-look" }, "Next look by the clock: ", h("strong", { text: tl.next_look ? when(tl.next_look) : "none" }),
          " (" + (tl.next_look_basis || "") + ")"),
        h("div", { "class": "grid" }, cards),
        h("section", { "class": "card", style: "margin-top:1rem" }, h("h2", { text: "Timeline (latest " + (tl.kept || "") + ")" }),
          changes.length ? h("table", { id: "timeline" }, h("thead", {}, h("tr", {}, ["As of", "Ladder", "Change", "Cause"].map(function (t) { return h("th", { text: t }); }))),
            h("tbody", {}, changes.map(function (c) {
              return h("tr", { "class": "change " + (c.direction || ""), "data-event-id": c.event_id },
                h("td", { text: when(c.as_of) }), h("td", { text: c.ladder }),
                h("td", { "class": c.direction, text: (c.previous_grade || "\u2014") + " \u2192 " + c.grade }),
                h("td", { text: c.cause.kind + (c.cause.event_id ? " " + c.cause.event_id : "") }));
            }))) : h("p", { "class": "muted", text: "No change kept for this customer." }))]);
    });
  }

  function stop() { if (timer) { clearTimeout(timer); timer = null; } }

  function route() {
    stop();
    var hash = location.hash.replace(/^#\/?/, "");
    var page = hash.split("/")[0] || "overview";
    document.querySelectorAll("nav a").forEach(function (a) { a.classList.toggle("active", a.getAttribute("data-nav") === page); });
    var work = page === "alerts" ? alerts() : page === "at-risk" ? atRisk()
      : page === "customer" ? customer(decodeURIComponent(hash.slice("customer/".length))) : overview();
    work.then(function () {
      document.getElementById("logout").hidden = !token();
      statusLine.textContent = "updated " + new Date().toLocaleTimeString();
      document.body.setAttribute("data-loaded", page);
      timer = setTimeout(route, REFRESH_MS);
    }, function (err) {
      if (err instanceof Unauthorized) {
        var had = token();
        sessionStorage.removeItem(TOKEN_KEY);
        login(had ? "That token was refused." : null);
        return;
      }
      statusLine.textContent = "error: " + err.message + "; retrying";
      timer = setTimeout(route, REFRESH_MS);
    });
  }

  document.getElementById("search").addEventListener("submit", function (e) {
    e.preventDefault();
    var id = document.getElementById("search-input").value.trim();
    if (id) location.hash = "#/customer/" + encodeURIComponent(id);
  });
  document.getElementById("logout").addEventListener("click", function () { sessionStorage.removeItem(TOKEN_KEY); login(null); });
  window.addEventListener("hashchange", route);
  route();
})();
