// A real, unmodified Node FHIR client (npm `fhir-kit-client`, pinned in package.json) driven
// through the sidecar in reverse mode: its baseUrl is the sidecar's FHIR base.
//
//   node tests/real/fhirkit_scenario.mjs <sidecar FHIR base> <api key> [run id]
//
// Prints one JSON document on stdout: every HTTP exchange the library made (step, method, URL,
// status, the X-Correlation-ID it received), the search pages it followed with Bundle.link, the
// transaction response and the denied write as the library surfaced it. The pytest side
// (tests/test_real_clients.py) checks those correlation ids against the sidecar's audit file and
// the upstream's own traffic log. Exit status 0 = the scenario ran to the end (assertions are
// Python's); 1 = the library threw where it should not have (the JSON then carries `error`).
import { Client } from 'fhir-kit-client';

const [base, apiKey, runArg] = process.argv.slice(2);
if (!base || !apiKey) {
  console.error('usage: node fhirkit_scenario.mjs <sidecar FHIR base> <api key> [run id]');
  process.exit(2);
}
const run = runArg || Math.random().toString(16).slice(2, 10);
const SYSTEM = 'urn:fhir-sidecar-test';
const out = { library: 'fhir-kit-client', run, exchanges: [], pages: [] };

// The api key travels as a plain header configured on the library (customHeaders).
const client = new Client({ baseUrl: base, customHeaders: { 'X-API-Key': apiKey } });

function record(step, result) {
  const { request, response } = Client.httpFor(result);
  out.exchanges.push({
    step,
    method: request?.method,
    url: response?.url || request?.url,
    status: response?.status,
    correlation_id: response?.headers.get('x-correlation-id') ?? null,
    location: response?.headers.get('location') ?? null,
  });
  return result;
}

function observation(patientId, extra = {}) {
  return {
    resourceType: 'Observation',
    status: 'final',
    code: { coding: [{ system: SYSTEM, code: run }], text: 'fhir-kit-client scenario' },
    subject: { reference: `Patient/${patientId}` },
    valueQuantity: { value: 72, unit: '/min' },
    ...extra,
  };
}

try {
  // create
  const patient = record('create-patient', await client.create({
    resourceType: 'Patient', body: { resourceType: 'Patient', name: [{ family: 'Kit', given: [run] }] },
  }));
  out.patient_id = patient.id;
  let last;
  for (let i = 0; i < 5; i += 1) {
    last = record('create-observation', await client.create({
      resourceType: 'Observation', body: observation(patient.id, { valueQuantity: { value: 60 + i, unit: '/min' } }),
    }));
  }
  // update
  const updated = record('update-observation', await client.update({
    resourceType: 'Observation', id: last.id, body: { ...last, status: 'amended' },
  }));
  out.updated = { id: updated.id, versionId: updated.meta?.versionId, status: updated.status };

  // search with paging: follow Bundle.link next through the library
  let page = record('search-page', await client.search({
    resourceType: 'Observation', searchParams: { subject: `Patient/${patient.id}`, _count: 2 },
  }));
  for (;;) {
    out.pages.push({
      links: (page.link || []).map((l) => ({ relation: l.relation, url: l.url })),
      ids: (page.entry || []).map((e) => e.resource?.id),
      fullUrls: (page.entry || []).map((e) => e.fullUrl),
    });
    if (out.pages.length > 10) throw new Error('paging did not end');
    const next = client.nextPage({ bundle: page });
    if (!next) break;
    page = record('search-page', await next);
  }

  // delete the updated Observation (after the search, which must still find all five)
  record('delete-observation', await client.delete({ resourceType: 'Observation', id: updated.id }));

  // transaction: a Patient and an Observation that points at it through its urn:uuid
  const tx = record('transaction', await client.transaction({
    body: {
      resourceType: 'Bundle', type: 'transaction', entry: [
        { fullUrl: 'urn:uuid:3f1c2a9e-6b0d-4c8e-9a57-2d4e8b1f0c63',
          resource: { resourceType: 'Patient', name: [{ family: 'KitTx', given: [run] }] },
          request: { method: 'POST', url: 'Patient' } },
        { resource: { ...observation('x'), subject: { reference: 'urn:uuid:3f1c2a9e-6b0d-4c8e-9a57-2d4e8b1f0c63' } },
          request: { method: 'POST', url: 'Observation' } },
      ],
    },
  }));
  out.transaction = {
    type: tx.type,
    entries: (tx.entry || []).map((e) => ({
      status: e.response?.status, location: e.response?.location, fullUrl: e.fullUrl,
      subject: e.resource?.subject?.reference ?? null,
    })),
  };

  // denied write: a type outside the client's scopes surfaces as the library's normal error
  try {
    await client.create({
      resourceType: 'Condition',
      body: { resourceType: 'Condition', subject: { reference: `Patient/${patient.id}` },
              code: { text: 'must never reach the EHR' } },
    });
    out.denied = { thrown: false };
  } catch (err) {
    const headers = err.config?.headers;
    out.denied = {
      thrown: true,
      message: String(err.message),
      status: err.response?.status,
      data: err.response?.data,
      correlation_id: headers && typeof headers.get === 'function' ? headers.get('x-correlation-id') : null,
    };
    out.exchanges.push({
      step: 'denied-create', method: 'POST', url: err.config?.url, status: err.response?.status,
      correlation_id: out.denied.correlation_id,
    });
  }
  out.ok = true;
  process.stdout.write(`${JSON.stringify(out)}\n`);
} catch (err) {
  out.ok = false;
  out.error = { message: String(err?.message || err), status: err?.response?.status, data: err?.response?.data };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(1);
}
