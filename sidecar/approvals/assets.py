"""The review page's stylesheet and script, served from /review/static/ (CSP: no inline code)."""

CSS = """
:root { --bg:#f5f6f8; --card:#fff; --ink:#1d2430; --muted:#667085; --line:#e4e7ec; --accent:#2459c4;
  --ok:#137a4b; --ok-bg:#e7f6ee; --bad:#b42318; --bad-bg:#fdecea; --warn:#935f00; --warn-bg:#fff4d6; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:var(--ink); background:var(--bg); }
header.top { background:#17223b; color:#fff; padding:.6rem 1.5rem; display:flex; align-items:center; gap:1rem; }
header.top .brand { font-weight:600; letter-spacing:.2px; }
header.top .brand a { color:#fff; text-decoration:none; }
header.top .who { margin-left:auto; color:#c9d3e8; font-size:.9rem; }
header.top form { margin:0; }
header.top button { background:transparent; border:1px solid #51607f; color:#fff; border-radius:6px; padding:.2rem .7rem; cursor:pointer; }
main { max-width:1180px; margin:1.5rem auto; padding:0 1.5rem; }
h1 { font-size:1.45rem; margin:.2rem 0 1rem; display:flex; align-items:center; gap:.6rem; flex-wrap:wrap; }
h2 { font-size:1.05rem; margin:0 0 .8rem; }
a { color:var(--accent); }
.muted { color:var(--muted); font-weight:400; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:1.1rem 1.3rem; margin-bottom:1.2rem;
  box-shadow:0 1px 2px rgba(16,24,40,.04); }
.grid { display:grid; grid-template-columns: minmax(0,3fr) minmax(280px,2fr); gap:1.2rem; }
@media (max-width:900px) { .grid { grid-template-columns:1fr; } }
dl.meta { display:grid; grid-template-columns: max-content 1fr; gap:.35rem 1rem; margin:0; }
dl.meta dt { color:var(--muted); }
dl.meta dd { margin:0; overflow-wrap:anywhere; }
code { font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; background:#f2f4f7; padding:.05rem .3rem; border-radius:4px; overflow-wrap:anywhere; }
.badge { display:inline-block; font-size:.78rem; font-weight:600; padding:.12rem .55rem; border-radius:999px; text-transform:uppercase; letter-spacing:.4px; }
.badge.pending { background:var(--warn-bg); color:var(--warn); }
.badge.approved { background:#e8eefc; color:var(--accent); }
.badge.released { background:var(--ok-bg); color:var(--ok); }
.badge.rejected, .badge.failed { background:var(--bad-bg); color:var(--bad); }
.badge.expired { background:#eef0f3; color:var(--muted); }
.flash { border-radius:8px; padding:.7rem 1rem; margin-bottom:1rem; border:1px solid; }
.flash.ok { background:var(--ok-bg); border-color:#b7e4cb; color:var(--ok); }
.flash.bad { background:var(--bad-bg); border-color:#f5c2bd; color:var(--bad); }
.flash.info { background:#eef3fd; border-color:#c9d8f7; color:#1f3f86; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:.45rem .6rem; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:.8rem; text-transform:uppercase; letter-spacing:.4px; color:var(--muted); font-weight:600; }
table.queue tbody tr { cursor:pointer; }
table.queue tbody tr:hover { background:#f8f9fc; }
table.tree td.k { color:#344054; white-space:nowrap; width:30%; }
table.diff td:first-child { width:30%; } table.diff td:nth-child(2) { width:6.5rem; }
table.tree tr.group td.k { font-weight:600; color:var(--ink); }
table.tree td.v { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; overflow-wrap:anywhere; }
.d1{padding-left:1.6rem}.d2{padding-left:2.8rem}.d3{padding-left:4rem}.d4{padding-left:5.2rem}.d5{padding-left:6.4rem}
.d6{padding-left:7.6rem}.d7{padding-left:8.8rem}.d8{padding-left:10rem}.d9{padding-left:11.2rem}.d10{padding-left:12.4rem}
table.diff td { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; overflow-wrap:anywhere; }
table.diff tr.added td.new { background:var(--ok-bg); }
table.diff tr.removed td.old { background:var(--bad-bg); text-decoration:line-through; }
table.diff tr.changed td.old { background:var(--bad-bg); }
table.diff tr.changed td.new { background:var(--ok-bg); }
table.diff tr.unchanged td { color:var(--muted); }
table.hide-unchanged tr.unchanged { display:none; }
.tag { font-size:.72rem; font-weight:600; text-transform:uppercase; padding:.05rem .4rem; border-radius:4px; }
.tag.added { background:var(--ok-bg); color:var(--ok); } .tag.removed { background:var(--bad-bg); color:var(--bad); }
.tag.changed { background:var(--warn-bg); color:var(--warn); } .tag.unchanged { color:var(--muted); }
form.filters { display:flex; gap:.8rem; align-items:end; flex-wrap:wrap; margin-bottom:1rem; }
form.filters label { display:flex; flex-direction:column; font-size:.8rem; color:var(--muted); gap:.2rem; }
select, input[type=text], input[type=password], textarea { font:inherit; padding:.45rem .6rem; border:1px solid #cfd4dc; border-radius:7px; background:#fff; }
textarea { width:100%; min-height:5.5rem; resize:vertical; }
.btn { font:inherit; font-weight:600; border:0; border-radius:8px; padding:.55rem 1.1rem; cursor:pointer; }
.btn:disabled { opacity:.55; cursor:default; }
.btn.approve { background:var(--ok); color:#fff; width:100%; }
.btn.reject { background:#fff; color:var(--bad); border:1px solid #f0a9a2; width:100%; }
.btn.plain { background:#17223b; color:#fff; }
.actions form + form { margin-top:1.2rem; padding-top:1.2rem; border-top:1px solid var(--line); }
.hint { color:var(--muted); font-size:.85rem; margin:.3rem 0 .6rem; }
.stats { display:flex; gap:1rem; margin-bottom:1rem; flex-wrap:wrap; }
.stat { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:.6rem 1rem; min-width:10rem; }
.stat b { display:block; font-size:1.3rem; }
.empty { text-align:center; color:var(--muted); padding:2.5rem 0; }
.login { max-width:380px; margin:8vh auto; }
.login label { display:block; margin:.8rem 0 .3rem; font-weight:600; font-size:.9rem; }
.login input { width:100%; }
.login .btn { width:100%; margin-top:1.2rem; }
ul.reasons { margin:.2rem 0; padding-left:1.1rem; }
details summary { cursor:pointer; color:var(--accent); }
pre.raw { background:#0f172a; color:#e2e8f0; padding:1rem; border-radius:8px; overflow:auto; font-size:12.5px; max-height:28rem; }
.toggle { font-size:.85rem; color:var(--muted); display:flex; gap:.4rem; align-items:center; margin-bottom:.6rem; }
"""

JS = """
document.addEventListener('DOMContentLoaded', function () {
  document.querySelectorAll('form[method=post]').forEach(function (f) {
    f.addEventListener('submit', function () {
      f.querySelectorAll('button').forEach(function (b) { b.disabled = true; });
    });
  });
  var t = document.getElementById('show-unchanged'), d = document.getElementById('diff');
  if (t && d) { t.addEventListener('change', function () { d.classList.toggle('hide-unchanged', !t.checked); }); }
  var r = document.getElementById('reason'), c = document.getElementById('reason-count');
  if (r && c) {
    var upd = function () { c.textContent = r.value.length + ' / ' + r.maxLength; };
    r.addEventListener('input', upd); upd();
  }
  document.querySelectorAll('tr[data-href]').forEach(function (tr) {
    tr.addEventListener('click', function (e) { if (e.target.tagName !== 'A') { location.href = tr.dataset.href; } });
  });
  document.querySelectorAll('form.filters select').forEach(function (s) {
    s.addEventListener('change', function () { s.form.submit(); });
  });
});
"""
